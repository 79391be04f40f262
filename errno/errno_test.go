package errno_test

import (
	"errors"
	"fmt"
	"testing"

	"github.com/gomm-dev/gomm/errno"
	"github.com/stretchr/testify/assert"
)

func TestErrnoWrapsAndCompares(t *testing.T) {
	err := fmt.Errorf("pagetable: map %#x: %w", 0x1001, errno.ErrInvalid)
	assert.ErrorIs(t, err, errno.ErrInvalid)
	assert.NotErrorIs(t, err, errno.ErrNoMem)
	assert.Equal(t, "pagetable: map 0x1001: invalid argument (EINVAL)", err.Error())
	var e errno.Errno
	assert.True(t, errors.As(err, &e))
	assert.Equal(t, errno.ErrInvalid, e)
	assert.Equal(t, "errno 042", errno.Errno(42).Error())
}

func Example() {
	err := fmt.Errorf("mmap: %w", errno.ErrNoMem)
	fmt.Println(errors.Is(err, errno.ErrNoMem), err)
	// Output: true mmap: out of memory (ENOMEM)
}

func TestOf(t *testing.T) {
	e, ok := errno.Of(fmt.Errorf("outer: %w", fmt.Errorf("inner: %w", errno.ErrBusy)))
	assert.True(t, ok)
	assert.Equal(t, errno.ErrBusy, e)
	_, ok = errno.Of(errors.New("plain"))
	assert.False(t, ok)
	_, ok = errno.Of(nil)
	assert.False(t, ok)
	e, ok = errno.Of(errors.Join(errors.New("plain"), errno.ErrFault))
	assert.True(t, ok)
	assert.Equal(t, errno.ErrFault, e)
}

type claimsFault struct{}

func (claimsFault) Error() string        { return "a fault of its own type" }
func (claimsFault) Is(target error) bool { return target == errno.ErrFault }

func TestOfSeesIsMethods(t *testing.T) {
	e, ok := errno.Of(fmt.Errorf("wrapped: %w", claimsFault{}))
	assert.True(t, ok)
	assert.Equal(t, errno.ErrFault, e)
}
