// Package errno defines the error values every gomm package returns for bad
// input and resource failures, one per kernel errno they mirror, so that
// errors.Is(err, errno.ErrInvalid) holds whichever package refused the
// call. Each package re-exports the ones it returns (pagetable.ErrInvalid
// is errno.ErrInvalid) and wraps them with context.
//
// Kernel counterpart: include/uapi/asm-generic/errno-base.h. This package
// has no locks and no state.
package errno
