// Package devtlb holds what the example devices would otherwise each
// write again: the reverse index from host frames to the translations a
// device caches, which the checker asks about at every frame free
// (gomm.Cache.CachedPFN), a bounded translation cache built on it (a
// device TLB or IOTLB), and a device page table that keeps it exact.
//
// It has no kernel counterpart: real devices keep these in hardware.
// No type is safe for concurrent use; the device's own lock, the one
// its invalidation callbacks take, guards them.
package devtlb

import "fmt"

// PFNIndex counts, per host frame, the device translations that map it.
type PFNIndex map[uint64]int

// Add records one more translation to pfn.
func (x PFNIndex) Add(pfn uint64) { x[pfn]++ }

// Remove records one translation to pfn fewer.
func (x PFNIndex) Remove(pfn uint64) {
	if x[pfn]--; x[pfn] <= 0 {
		delete(x, pfn)
	}
}

// Cached answers gomm.Cache.CachedPFN: whether any translation maps pfn.
func (x PFNIndex) Cached(pfn uint64) (string, bool) {
	if n := x[pfn]; n > 0 {
		return fmt.Sprintf("%d translations", n), true
	}
	return "", false
}

// Total is the number of translations.
func (x PFNIndex) Total() int {
	n := 0
	for _, c := range x {
		n += c
	}
	return n
}

// Entry is one cached translation.
type Entry struct {
	PFN      uint64
	Writable bool
}

// TLB is a translation cache of at most a fixed number of entries,
// keyed by whatever the device tags translations with.
type TLB[K comparable] struct {
	size    int
	entries map[K]Entry
	Index   PFNIndex // the entries' frames
}

// New returns an empty TLB of size entries.
func New[K comparable](size int) *TLB[K] {
	return &TLB[K]{size: size, entries: map[K]Entry{}, Index: PFNIndex{}}
}

// Lookup returns the entry for k, if cached.
func (t *TLB[K]) Lookup(k K) (Entry, bool) {
	e, ok := t.entries[k]
	return e, ok
}

// Fill caches e for k, replacing k's entry or, when full, evicting an
// arbitrary one (the hardware's replacement policy does not matter to
// correctness: any entry may go at any time).
func (t *TLB[K]) Fill(k K, e Entry) {
	if _, ok := t.entries[k]; ok {
		t.drop(k)
	} else if len(t.entries) >= t.size {
		for victim := range t.entries {
			t.drop(victim)
			break
		}
	}
	t.entries[k] = e
	t.Index.Add(e.PFN)
}

// DropIf removes every entry whose key matches and returns how many.
func (t *TLB[K]) DropIf(match func(K) bool) int {
	n := 0
	for k := range t.entries {
		if match(k) {
			t.drop(k)
			n++
		}
	}
	return n
}

// Len is the number of entries.
func (t *TLB[K]) Len() int { return len(t.entries) }

func (t *TLB[K]) drop(k K) {
	t.Index.Remove(t.entries[k].PFN)
	delete(t.entries, k)
}
