package rmap

import (
	"fmt"
	"iter"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/gomm-dev/gomm/errno"
	"github.com/gomm-dev/gomm/internal/itree"
	"github.com/gomm-dev/gomm/locks"
	"github.com/gomm-dev/gomm/physmem"
)

// ErrExist is returned when a page-cache slot is already taken.
var ErrExist = errno.ErrExist

var fileIDs atomic.Uint64

// File is an address_space: a file's page cache (page offset -> frame),
// the tree of VMAs that map it (i_mmap, keyed by the page-offset range
// each maps), and its backing store, where written-back pages live
// while they are not cached. A frame in the cache has the File as its
// mapping and its page offset as its index.
//
// Lock order: i_mmap_rwsem (ClassIMmapRWSem) before any anon_vma lock
// and page-table lock; the cache lock (xa_lock) is a leaf.
type File struct {
	id    uint64
	ram   *physmem.Allocator
	immap locks.RWSem // i_mmap_rwsem

	tree itree.Tree[*VMA] // protected by immap

	mu    sync.Mutex                // xa_lock
	pages map[uint64]*physmem.Frame // protected by mu; each holds a reference
	store map[uint64][]byte         // backing store; protected by mu
	size  uint64                    // in bytes; protected by mu
}

// NewFile returns an empty file of size bytes whose pages come from ram.
func NewFile(ram *physmem.Allocator, size uint64) *File {
	f := &File{id: fileIDs.Add(1), ram: ram, pages: map[uint64]*physmem.Frame{}, store: map[uint64][]byte{}, size: size}
	f.immap.Init(locks.ClassIMmapRWSem)
	return f
}

// ID returns a stable identity, for reports.
func (f *File) ID() uint64 { return f.id }

// IsAnon reports false: a page-cache frame is file-backed.
func (f *File) IsAnon() bool { return false }

// Sem returns the i_mmap_rwsem, for TakeAll at notifier registration.
func (f *File) Sem() *locks.RWSem { return &f.immap }

// Size returns the file's size in bytes.
func (f *File) Size() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.size
}

// SetSize records a new size. Shrinking is truncate's job: the caller
// unmaps and drops the pages past the new end.
func (f *File) SetSize(size uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if size < f.size { // growing leaves nothing past the end to forget
		for idx := range f.store {
			if idx*pageSize >= size {
				delete(f.store, idx) // what was past a new end reads as zeros
			}
		}
	}
	f.size = size
}

// Link puts v into the file's i_mmap tree (vma_link's file side). v.File
// must be f.
func (f *File) Link(v *VMA) error {
	if v.File != f || v.inFile || v.End <= v.Start {
		return fmt.Errorf("rmap: link of VMA [%#x, %#x) into file %d: %w", v.Start, v.End, f.id, ErrInvalid)
	}
	f.immap.Lock()
	v.fileNode = itree.Node[*VMA]{Start: v.PgOff, Last: v.lastIndex(), Value: v}
	f.tree.Insert(&v.fileNode)
	v.inFile = true
	f.immap.Unlock()
	return nil
}

// Unlink takes v out of the file's tree; a VMA not linked is left alone.
func (f *File) Unlink(v *VMA) {
	f.immap.Lock()
	if v.inFile {
		f.tree.Remove(&v.fileNode)
		v.inFile = false
	}
	f.immap.Unlock()
}

// Mapped reports whether any VMA maps the file.
func (f *File) Mapped() bool {
	f.immap.RLock()
	defer f.immap.RUnlock()
	return f.tree.Len() > 0
}

// VMAsIn yields every VMA that maps some page in [first, last] (the
// vma_interval_tree walk of unmap_mapping_range). The caller holds the
// i_mmap_rwsem (Sem().RLock()).
func (f *File) VMAsIn(first, last uint64) iter.Seq[*VMA] {
	return func(yield func(*VMA) bool) {
		for n := range f.tree.Overlapping(first, last) {
			if !yield(n.Value) {
				return
			}
		}
	}
}

// Lookup returns the cached frame at index with a reference taken, or nil
// (filemap_get_folio). The frame may be truncated or reclaimed the moment
// the cache lock drops: check Cached under its page lock before relying
// on it.
func (f *File) Lookup(index uint64) *physmem.Frame {
	f.mu.Lock()
	defer f.mu.Unlock()
	p := f.pages[index]
	if p == nil || !f.ram.TryGet(p) {
		return nil
	}
	return p
}

// Cached reports whether p is still the file's page at its index. The
// caller holds p's page lock, which truncation and reclaim take before
// removing a page.
func (f *File) Cached(p *physmem.Frame) bool {
	m, idx := p.Mapping()
	if m != physmem.Mapping(f) {
		return false
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.pages[idx] == p
}

// Add inserts the new frame p at index (filemap_add_folio): the cache
// takes over the caller's reference, and p's mapping becomes the file.
// p must not be visible to anybody else yet. An index taken is ErrExist;
// one past the end of the file is ErrInvalid.
func (f *File) Add(index uint64, p *physmem.Frame) error {
	return f.add(index, p, false)
}

// AddPastEOF is Add for a writer that holds off truncation and will
// extend the file over the page once its data has landed
// (write_begin): the page may lie past the end of the file.
func (f *File) AddPastEOF(index uint64, p *physmem.Frame) error {
	return f.add(index, p, true)
}

func (f *File) add(index uint64, p *physmem.Frame, pastEOF bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case !pastEOF && index*pageSize >= f.size:
		return fmt.Errorf("rmap: page %d of a %d-byte file: %w", index, f.size, ErrInvalid)
	case f.pages[index] != nil:
		return fmt.Errorf("rmap: page %d of file %d: %w", index, f.id, ErrExist)
	}
	p.SetMapping(f, index)
	f.pages[index] = p
	return nil
}

// Remove takes p out of the cache (__filemap_remove_folio) and returns
// the cache's reference for the caller to drop. The caller holds p's
// page lock and has unmapped it; it reports false if p was not cached.
func (f *File) Remove(p *physmem.Frame) bool {
	_, idx := p.Mapping()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.pages[idx] != p {
		return false
	}
	delete(f.pages, idx)
	p.SetMapping(nil, 0)
	return true
}

// Indexes returns the cached page offsets at or above from, in order.
func (f *File) Indexes(from uint64) []uint64 {
	f.mu.Lock()
	var out []uint64
	for idx := range f.pages {
		if idx >= from {
			out = append(out, idx)
		}
	}
	f.mu.Unlock()
	slices.Sort(out)
	return out
}

// CachedPages returns how many pages are cached.
func (f *File) CachedPages() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.pages)
}

// ReadPage fills p with the file's page at index from the backing store
// (zeros if it was never written back): the read_folio of a cache miss.
func (f *File) ReadPage(index uint64, p *physmem.Frame) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if data := f.store[index]; data != nil {
		_, err := p.WriteAt(data, 0)
		return err
	}
	return p.Zero()
}

// WritePage copies p to the backing store at its index (writepage); the
// caller holds p's page lock and has cleaned it. A page written back
// before reuses its buffer. Both copies run under the cache lock, which
// orders them.
func (f *File) WritePage(p *physmem.Frame) error {
	_, idx := p.Mapping()
	f.mu.Lock()
	defer f.mu.Unlock()
	if idx*pageSize >= f.size {
		return nil // truncated meanwhile
	}
	buf := f.store[idx]
	if buf == nil {
		buf = make([]byte, pageSize)
	}
	if _, err := p.ReadAt(buf, 0); err != nil {
		return err
	}
	f.store[idx] = buf
	return nil
}

// Replace puts dst in old's place in the cache (a migration's
// folio_migrate_mapping): dst takes old's index and the cache's
// reference moves to it, which the caller provides. Both are locked;
// it reports false if old was not cached.
func (f *File) Replace(old, dst *physmem.Frame) bool {
	_, idx := old.Mapping()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.pages[idx] != old {
		return false
	}
	f.pages[idx] = dst
	dst.SetMapping(f, idx)
	return true
}
