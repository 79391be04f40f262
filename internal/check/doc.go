// Package check is gomm's invariant checker: it proves, rather than hopes,
// that no translation cache ever keeps a translation it must have dropped.
//
// The invariant (DESIGN.md): a frame may be freed only after every cached
// translation of it is gone, and a downgrade (munmap, madvise, mprotect to
// fewer rights) is complete only when no cache still allows the old
// access. Every translation cache registers with the Checker: each
// simulated CPU's TLB, and each secondary MMU through the same small
// interface. The Checker is told when frames are freed and when downgrades
// begin and end, asks every cache, and records a Violation with enough
// context to debug it.
//
// Kernel counterpart: none; it plays the part of the hardware that would
// silently use the stale translation.
//
// A nil *Checker is a checker that is off: every method is a no-op, so the
// hot paths pay one nil test.
//
// Lock order: the Checker's own mutex is a leaf. It calls caches without
// holding it; caches take their own locks (a CPU's access lock), so the
// Checker must not be called with such a lock held.
package check
