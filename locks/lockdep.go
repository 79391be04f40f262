package locks

import (
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
)

// lockdepOn gates every tracking hook. Off, a lock operation pays one atomic
// load (a plain MOV on amd64) and a predictable branch.
var lockdepOn atomic.Bool

// maxRecordedViolations bounds memory when a broken lock order repeats in a
// loop; the count of dropped reports is still kept.
const maxRecordedViolations = 1000

// maxStackDepth is how many frames an acquisition site keeps.
const maxStackDepth = 8

type heldLock struct {
	key    any
	class  *Class
	sub    int
	shared bool
	// nested marks an acquisition made under a nest lock (TakeAll): it may
	// sit beside other nested locks of its own class.
	nested bool
	gid    int64
	pcs    []uintptr
}

// lockdep is the checker's state. Only touched when lockdepOn is set.
var lockdep struct {
	mu         sync.Mutex
	held       map[int64][]*heldLock // by goroutine; protected by mu
	byKey      map[any][]*heldLock   // by lock, for releases; protected by mu
	violations []Violation           // protected by mu
	dropped    int                   // protected by mu
	handler    func(Violation)       // protected by mu
}

// ViolationKind says which rule an acquisition broke.
type ViolationKind uint8

const (
	// OrderInversion: a lock was taken while a lock of a later class (or a
	// higher subclass of its own class) was held.
	OrderInversion ViolationKind = iota + 1
	// Recursion: a goroutine took a lock it already holds. For a sleeping
	// lock that is a self-deadlock; for a fair RWSem even a recursive read
	// deadlocks once a writer queues between the two.
	Recursion
	// SameClassNesting: two locks of one class held together without a
	// nesting annotation, the pattern that deadlocks when two goroutines
	// take the pair in opposite orders.
	SameClassNesting
)

func (k ViolationKind) String() string {
	switch k {
	case OrderInversion:
		return "lock order inversion"
	case Recursion:
		return "recursive locking"
	case SameClassNesting:
		return "same-class nesting without annotation"
	}
	return fmt.Sprintf("ViolationKind(%d)", uint8(k))
}

// Acquisition describes one side of a violation: which lock class, how it
// was taken, by which goroutine, and where.
type Acquisition struct {
	Class     *Class
	Subclass  int
	Shared    bool
	Goroutine int64
	// Stack is the acquisition site, innermost frame first, one
	// "function file:line" per line.
	Stack string
}

// Violation is one report of the lock-order checker: the lock already held
// and the acquisition that conflicts with it.
type Violation struct {
	Kind      ViolationKind
	Held      Acquisition
	Acquiring Acquisition
}

func (v Violation) String() string {
	mode := func(a Acquisition) string {
		if a.Shared {
			return "shared"
		}
		return "exclusive"
	}
	return fmt.Sprintf("lockdep: %s: goroutine %d acquiring %s (subclass %d, %s) at\n%s\nwhile holding %s (subclass %d, %s) taken at\n%s",
		v.Kind, v.Acquiring.Goroutine,
		v.Acquiring.Class, v.Acquiring.Subclass, mode(v.Acquiring), indent(v.Acquiring.Stack),
		v.Held.Class, v.Held.Subclass, mode(v.Held), indent(v.Held.Stack))
}

// Error makes a Violation usable as an error value in test failures.
func (v Violation) Error() string { return v.String() }

func indent(s string) string {
	return "\t" + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n\t")
}

// EnableLockdep turns the lock-order checker on. Call it while no tracked
// lock is held (TestMain is the usual place): locks taken before it are
// unknown to the checker.
func EnableLockdep() {
	lockdep.mu.Lock()
	lockdep.held = make(map[int64][]*heldLock)
	lockdep.byKey = make(map[any][]*heldLock)
	lockdep.mu.Unlock()
	lockdepOn.Store(true)
}

// DisableLockdep turns the checker off; recorded violations are kept.
func DisableLockdep() {
	lockdepOn.Store(false)
	lockdep.mu.Lock()
	lockdep.held, lockdep.byKey = nil, nil
	lockdep.mu.Unlock()
}

// LockdepEnabled reports whether the checker is on.
func LockdepEnabled() bool { return lockdepOn.Load() }

// LockdepViolations returns the violations recorded so far, oldest first,
// and how many more were dropped once the record was full.
func LockdepViolations() (recorded []Violation, dropped int) {
	lockdep.mu.Lock()
	defer lockdep.mu.Unlock()
	return append([]Violation(nil), lockdep.violations...), lockdep.dropped
}

// ClearLockdepViolations forgets the recorded violations.
func ClearLockdepViolations() {
	lockdep.mu.Lock()
	lockdep.violations = nil
	lockdep.dropped = 0
	lockdep.mu.Unlock()
}

// SetLockdepHandler installs fn to be called, outside the checker's own
// lock, with every violation as it is found (after it is recorded). It
// returns the previous handler. nil removes it.
func SetLockdepHandler(fn func(Violation)) (prev func(Violation)) {
	lockdep.mu.Lock()
	defer lockdep.mu.Unlock()
	prev, lockdep.handler = lockdep.handler, fn
	return prev
}

// TrackAcquire tells the checker that the calling goroutine is about to
// take the lock identified by key (a pointer to the lock) in class c. Lock
// types built outside this package (the frame lock in physmem) call it from
// their Lock method before they may block, so that a deadlock is reported
// rather than hung on. The acquisition site recorded is the caller of that
// Lock method. No-op while the checker is off.
func TrackAcquire(key any, c *Class, shared bool) {
	if lockdepOn.Load() {
		trackAcquire(key, c, 0, shared, false, false, 3)
	}
}

// TrackTryAcquire records a successful trylock: it cannot deadlock, so no
// order is checked, but the lock is held from now on.
func TrackTryAcquire(key any, c *Class, shared bool) {
	if lockdepOn.Load() {
		trackAcquire(key, c, 0, shared, true, false, 3)
	}
}

// TrackRelease tells the checker the lock identified by key was released.
// A lock released by a goroutine other than the one that took it (allowed
// for every gomm lock, as for Go's) is found wherever it is held, with one
// limit: when several goroutines hold it shared, or wait for it, and the
// releaser is none of them, the checker cannot tell whose hold ended and
// drops the oldest record. gomm itself never releases that way.
func TrackRelease(key any) {
	if lockdepOn.Load() {
		trackRelease(key)
	}
}

// LockdepHolds reports whether the calling goroutine holds the lock
// identified by key, as far as the checker knows (lockdep_assert_held). It
// reports true while the checker is off, so assertions built on it pass.
func LockdepHolds(key any) bool {
	if !lockdepOn.Load() {
		return true
	}
	gid := goid()
	lockdep.mu.Lock()
	defer lockdep.mu.Unlock()
	for _, h := range lockdep.held[gid] {
		if h.key == key {
			return true
		}
	}
	return false
}

func trackAcquire(key any, c *Class, sub int, shared, try, nested bool, skip int) {
	pcs := make([]uintptr, maxStackDepth)
	pcs = pcs[:runtime.Callers(skip+1, pcs)]
	gid := goid()
	me := &heldLock{key: key, class: c, sub: sub, shared: shared, nested: nested, gid: gid, pcs: pcs}

	var found []Violation
	lockdep.mu.Lock()
	if lockdep.held == nil {
		lockdep.held = make(map[int64][]*heldLock)
		lockdep.byKey = make(map[any][]*heldLock)
	}
	if !try {
		for _, h := range lockdep.held[gid] {
			if kind := conflict(h, me); kind != 0 {
				found = append(found, Violation{Kind: kind, Held: h.acquisition(), Acquiring: me.acquisition()})
			}
		}
	}
	lockdep.held[gid] = append(lockdep.held[gid], me)
	lockdep.byKey[key] = append(lockdep.byKey[key], me)
	for _, v := range found {
		if len(lockdep.violations) < maxRecordedViolations {
			lockdep.violations = append(lockdep.violations, v)
		} else {
			lockdep.dropped++
		}
	}
	handler := lockdep.handler
	lockdep.mu.Unlock()

	if handler != nil {
		for _, v := range found {
			handler(v)
		}
	}
}

// conflict returns why taking next while holding held breaks the order, or
// zero when it does not.
func conflict(held, next *heldLock) ViolationKind {
	if held.key == next.key {
		return Recursion
	}
	if held.class == nil || next.class == nil {
		return 0
	}
	hr, nr := held.class.rank, next.class.rank
	switch {
	case hr < nr:
		return 0
	case hr > nr:
		return OrderInversion
	}
	if held.class != next.class {
		// Two distinct classes declared at one rank have no order between
		// them; holding both is a nesting nobody declared.
		return SameClassNesting
	}
	switch {
	case held.sub < next.sub:
		return 0
	case held.sub > next.sub:
		return OrderInversion
	case held.nested && next.nested:
		return 0
	}
	return SameClassNesting
}

func trackRelease(key any) {
	lockdep.mu.Lock()
	holders := lockdep.byKey[key]
	if len(holders) == 0 {
		lockdep.mu.Unlock()
		return // taken before the checker was turned on
	}
	h := holders[0]
	if len(holders) > 1 {
		// Shared holders: release the caller's own record if it has one.
		// Finding out who the caller is costs a stack read, so it is paid
		// only here.
		lockdep.mu.Unlock()
		gid := goid()
		lockdep.mu.Lock()
		holders = lockdep.byKey[key]
		if len(holders) == 0 {
			lockdep.mu.Unlock()
			return
		}
		h = holders[0]
		for _, x := range holders {
			if x.gid == gid {
				h = x
				break
			}
		}
	}
	lockdep.byKey[key] = removeRecord(holders, h)
	if len(lockdep.byKey[key]) == 0 {
		delete(lockdep.byKey, key)
	}
	list := removeRecord(lockdep.held[h.gid], h)
	if len(list) == 0 {
		delete(lockdep.held, h.gid)
	} else {
		lockdep.held[h.gid] = list
	}
	lockdep.mu.Unlock()
}

// removeRecord removes h from list, keeping the order.
func removeRecord(list []*heldLock, h *heldLock) []*heldLock {
	for i := len(list) - 1; i >= 0; i-- {
		if list[i] == h {
			copy(list[i:], list[i+1:])
			list[len(list)-1] = nil
			return list[:len(list)-1]
		}
	}
	return list
}

// trackDowngrade turns the calling goroutine's exclusive hold of key into a
// shared one.
func trackDowngrade(key any) {
	gid := goid()
	lockdep.mu.Lock()
	defer lockdep.mu.Unlock()
	for _, h := range lockdep.held[gid] {
		if h.key == key {
			h.shared = true
			return
		}
	}
}

func (h *heldLock) acquisition() Acquisition {
	var b strings.Builder
	frames := runtime.CallersFrames(h.pcs)
	for {
		f, more := frames.Next()
		if f.Function != "" {
			fmt.Fprintf(&b, "%s %s:%d\n", f.Function, f.File, f.Line)
		}
		if !more {
			break
		}
	}
	return Acquisition{Class: h.class, Subclass: h.sub, Shared: h.shared, Goroutine: h.gid, Stack: b.String()}
}

// goid returns the calling goroutine's id. Go hides it on purpose; lockdep
// needs a per-task identity, and only pays for this while it is on.
func goid() int64 {
	var buf [40]byte
	n := runtime.Stack(buf[:], false)
	s := buf[:n]
	const prefix = "goroutine "
	if len(s) < len(prefix) {
		return -1
	}
	var id int64
	for _, c := range s[len(prefix):] {
		if c < '0' || c > '9' {
			break
		}
		id = id*10 + int64(c-'0')
	}
	return id
}
