package errno

import "errors"

// Errno is a kernel-style error number. Its values compare equal across
// packages, so errors.Is works through any amount of wrapping.
type Errno uint8

// The errors gomm returns.
const (
	ErrInvalid Errno = iota + 1 // EINVAL: bad argument (address, length, flags)
	ErrNoMem                    // ENOMEM: out of frames, swap or page-table memory; or no mapping
	ErrFault                    // EFAULT: address not mapped or not accessible
	ErrAgain                    // EAGAIN: would block in a non-blocking context; retry
	ErrBusy                     // EBUSY: resource in use (a huge leaf in the way, a pinned page)
	ErrExist                    // EEXIST: something is already there
	ErrClosed                   // ESRCH: the object (mm, subscription) is gone
	ErrPerm                     // EACCES: the access is not allowed by the protection
)

var names = [...]string{
	ErrInvalid: "invalid argument (EINVAL)",
	ErrNoMem:   "out of memory (ENOMEM)",
	ErrFault:   "bad address (EFAULT)",
	ErrAgain:   "try again (EAGAIN)",
	ErrBusy:    "resource busy (EBUSY)",
	ErrExist:   "already exists (EEXIST)",
	ErrClosed:  "no such object (ESRCH)",
	ErrPerm:    "permission denied (EACCES)",
}

func (e Errno) Error() string {
	if int(e) < len(names) && names[e] != "" {
		return names[e]
	}
	return "errno " + string('0'+rune(e/100%10)) + string('0'+rune(e/10%10)) + string('0'+rune(e%10))
}

// Of returns the first errno value err matches with errors.Is (so also
// error types whose Is method claims one), and whether it matches any:
// what a fuzz test asks of every error ("typed, not a bare string").
func Of(err error) (Errno, bool) {
	if err == nil {
		return 0, false
	}
	for e := ErrInvalid; int(e) < len(names); e++ {
		if errors.Is(err, e) {
			return e, true
		}
	}
	return 0, false
}
