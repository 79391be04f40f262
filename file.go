package gomm

import (
	"fmt"
	"io"

	"github.com/gomm-dev/gomm/locks"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/rmap"
)

// File is a file of the machine (an inode with its address_space): its
// pages live in the page cache, are written back to a backing store by
// Sync, Msync and reclaim, and are read back from it on a cache miss.
// Mapping it shared makes writes through the mapping reach the file;
// mapping it private copies a page on its first write. Shared anonymous
// memory is a File too, one per mapping, as with tmpfs.
//
// Lock order: the inode lock (i_rwsem: reads, writes and truncation of
// one file) comes before mmap_lock; page locks and the rmap locks are
// taken under it.
type File struct {
	m     *Machine
	as    *rmap.File
	inode locks.RWSem // i_rwsem: writes and truncation exclude each other
	// anon: the memory of a MAP_SHARED|MAP_ANONYMOUS mapping, which only
	// its mappings can reach. Set before the file is shared.
	anon bool
}

// MaxFileSize bounds a File (MAX_LFS_FILESIZE of a 48-bit address
// space is plenty for a simulation).
const MaxFileSize = 1 << 46

// NewFile creates a file of size bytes, all zeros.
func (m *Machine) NewFile(size uint64) (*File, error) {
	if size > MaxFileSize {
		return nil, fmt.Errorf("gomm: file of %d bytes: %w", size, ErrInvalid)
	}
	f := &File{m: m, as: rmap.NewFile(m.ram, size)}
	f.inode.Init(locks.ClassInodeRWSem)
	return f, nil
}

// Size returns the file's size in bytes.
func (f *File) Size() uint64 { return f.as.Size() }

// CachedPages returns how many of its pages are in the page cache.
func (f *File) CachedPages() int { return f.as.CachedPages() }

// lockedPage returns the file's page at index locked and with a
// reference, reading it into the cache on a miss (filemap_fault's and
// generic_perform_write's page lookup). A page past the end of the file
// is ErrFault (SIGBUS), unless pastEOF: a write may create the page it is
// about to extend the file over.
func (f *File) lockedPage(index uint64, pastEOF bool) (*physmem.Frame, error) {
	for {
		if !pastEOF && index*PageSize >= f.as.Size() {
			return nil, fmt.Errorf("gomm: page %d is past the end of the file: %w", index, ErrFault)
		}
		if p := f.as.Lookup(index); p != nil {
			p.Lock()
			if f.as.Cached(p) {
				return p, nil
			}
			p.Unlock() // truncated or reclaimed meanwhile
			_ = f.m.ram.Put(p)
			continue
		}
		p, err := f.m.allocFrame()
		if err != nil {
			return nil, err
		}
		p.Lock()
		if err := f.as.ReadPage(index, p); err != nil {
			p.Unlock()
			_ = f.m.ram.Put(p)
			return nil, err
		}
		p.SetFlags(physmem.FlagUptodate)
		_ = f.m.ram.Get(p) // one for the cache, one for the caller
		add := f.as.Add
		if pastEOF {
			add = f.as.AddPastEOF
		}
		if err := add(index, p); err != nil {
			p.Unlock()
			_ = f.m.ram.Put(p)
			_ = f.m.ram.Put(p)
			continue // another got there first, or the file shrank
		}
		f.m.lru.add(p, false)
		return p, nil
	}
}

// ReadAt reads len(p) bytes from off, as io.ReaderAt does: at the end of
// the file it returns io.EOF with what it read.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("gomm: read at %d: %w", off, ErrInvalid)
	}
	f.inode.RLock()
	defer f.inode.RUnlock()
	size := f.as.Size()
	if uint64(off) >= size {
		return 0, io.EOF
	}
	q := p[:min(uint64(len(p)), size-uint64(off))]
	n, err := f.eachPage(q, uint64(off), false, func(page *physmem.Frame, chunk []byte, at int) error {
		_, err := page.ReadAt(chunk, at)
		return err
	})
	if err == nil && n < len(p) {
		err = io.EOF
	}
	return n, err
}

// WriteAt writes p at off, growing the file if it ends past its size.
// The pages it writes are dirty until written back. The size grows page
// by page as the data lands (generic_write_end), so a write that runs
// out of memory leaves the file as long as what it wrote.
func (f *File) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || uint64(off)+uint64(len(p)) > MaxFileSize {
		return 0, fmt.Errorf("gomm: write of %d bytes at %d: %w", len(p), off, ErrInvalid)
	}
	f.inode.Lock()
	defer f.inode.Unlock()
	return f.eachPage(p, uint64(off), true, func(page *physmem.Frame, chunk []byte, at int) error {
		_, err := page.WriteAt(chunk, at)
		page.SetFlags(physmem.FlagDirty)
		return err
	})
}

// eachPage runs fn on each page of the file that [off, off+len(p))
// covers, locked and in the cache, with the part of p that falls in it
// and where in the page that part starts. It returns how many bytes of
// p it got through. grow (a write, under the inode lock for write)
// extends the file over each part once fn has put it in its page.
func (f *File) eachPage(p []byte, off uint64, grow bool, fn func(page *physmem.Frame, chunk []byte, at int) error) (int, error) {
	done := 0
	for done < len(p) {
		pos := off + uint64(done)
		page, err := f.lockedPage(pos/PageSize, grow)
		if err != nil {
			return done, err
		}
		n := min(len(p)-done, PageSize-int(pos%PageSize))
		err = fn(page, p[done:done+n], int(pos%PageSize))
		if end := pos + uint64(n); grow && err == nil && end > f.as.Size() {
			f.as.SetSize(end)
		}
		page.Unlock()
		_ = f.m.ram.Put(page)
		if err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// Truncate sets the file's size (truncate(2)). Shrinking unmaps the
// pages past the new end from every process that maps them, private
// copies included, as unmap_mapping_range does (each MM's subscribers
// see an EventClear of the range), then drops them from the page cache;
// a later access there through a mapping is ErrFault (SIGBUS).
func (f *File) Truncate(size uint64) error {
	if size > MaxFileSize {
		return fmt.Errorf("gomm: truncate to %d: %w", size, ErrInvalid)
	}
	f.inode.Lock()
	defer f.inode.Unlock()
	old := f.as.Size()
	f.as.SetSize(size)
	if size >= old {
		return nil
	}
	first := (size + PageSize - 1) / PageSize
	err := f.unmapRange(first)
	f.dropPages(first)
	return err
}

// dropPages takes the pages from index first on out of the page cache
// (truncate_inode_pages_range), unmapping any a fault mapped since the
// caller unmapped the range.
func (f *File) dropPages(first uint64) {
	for _, idx := range f.as.Indexes(first) {
		p := f.as.Lookup(idx)
		if p == nil {
			continue
		}
		p.Lock()
		if f.as.Cached(p) {
			if p.MapCount() > 0 {
				// Faulted in between the unmap and the lock.
				f.m.rmapEnv.TryToUnmap(p, false)
			}
			if f.as.Remove(p) {
				_ = f.m.ram.Put(p) // the cache's reference
			}
		}
		p.Unlock()
		_ = f.m.ram.Put(p)
	}
	f.m.swap.dropOrphans()
}

// releaseIfUnmapped frees the pages of shared anonymous memory once its
// last mapping is gone (the shmem inode's eviction at the last fput):
// nothing else can reach them. Idempotent: two MMs may unmap their last
// mappings at once.
func (f *File) releaseIfUnmapped() {
	if f.anon && !f.as.Mapped() {
		f.dropPages(0)
	}
}

// unmapRange zaps every mapping of the file's pages from index first on
// (unmap_mapping_range with even_cows): per VMA, an EventClear
// invalidation and a gather of its own, under the i_mmap_rwsem, which
// keeps the VMAs and their page tables alive.
func (f *File) unmapRange(first uint64) error {
	f.as.Sem().RLock()
	defer f.as.Sem().RUnlock()
	var err error
	for v := range f.as.VMAsIn(first, ^uint64(0)/PageSize) {
		mm := (*MM)(v.Space.(*space))
		start := v.Start
		if first > v.PgOff {
			start = v.Start + (first-v.PgOff)*PageSize
		}
		if zerr := mm.zapRange("truncate", start, v.End); zerr != nil && err == nil {
			err = zerr
		}
	}
	return err
}

// Sync writes every dirty page back (fsync): each is first cleaned in
// every shared mapping (folio_mkclean: write-protected and flushed, so a
// write during writeback faults and dirties it again), then written.
// It returns how many pages it wrote.
func (f *File) Sync() (int, error) {
	return f.syncRange(0, ^uint64(0))
}

func (f *File) syncRange(first, last uint64) (int, error) {
	n := 0
	for _, idx := range f.as.Indexes(first) {
		if idx > last {
			break
		}
		p := f.as.Lookup(idx)
		if p == nil {
			continue
		}
		p.Lock()
		if f.as.Cached(p) {
			dirty := f.m.rmapEnv.Mkclean(p)
			if p.TestAndClearFlag(physmem.FlagDirty) || dirty {
				p.SetFlags(physmem.FlagWriteback)
				err := f.as.WritePage(p)
				p.ClearFlags(physmem.FlagWriteback)
				if err != nil {
					p.SetFlags(physmem.FlagDirty)
					p.Unlock()
					_ = f.m.ram.Put(p)
					return n, err
				}
				n++
			}
		}
		p.Unlock()
		_ = f.m.ram.Put(p)
	}
	return n, nil
}
