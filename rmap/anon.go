package rmap

import (
	"fmt"
	"iter"
	"sync/atomic"

	"github.com/gomm-dev/gomm/errno"
	"github.com/gomm-dev/gomm/internal/itree"
	"github.com/gomm-dev/gomm/locks"
)

// ErrInvalid is returned for misuse: a VMA linked twice, unlinked twice.
var ErrInvalid = errno.ErrInvalid

// Pool counts the anon_vmas of one machine and tells whoever asks when
// one is freed. Its zero value is ready.
type Pool struct {
	live      atomic.Int64
	allocated atomic.Uint64
	// OnFree, if set before use, is called with every anon_vma as it is
	// freed (tests check that a root goes last).
	OnFree func(*AnonVMA)
}

// Live returns the number of anon_vmas not yet freed.
func (p *Pool) Live() int64 { return p.live.Load() }

// Allocated returns the number of anon_vmas ever allocated.
func (p *Pool) Allocated() uint64 { return p.allocated.Load() }

// AnonVMA groups the anonymous pages of a family of VMAs (struct
// anon_vma): a page's mapping points at the anon_vma it was faulted into,
// and a walk from there finds, through the chains in its tree, every VMA
// of every process that may map it (its own, and its fork descendants').
//
// A family shares one root; the root's RWSem is the lock of every
// anon_vma in the family (anon_vma->root->rwsem).
type AnonVMA struct {
	pool   *Pool
	root   *AnonVMA
	parent *AnonVMA
	id     uint64
	rwsem  locks.RWSem // only the root's is used

	// refcount: one for each VMA that has this as its anon_vma
	// ... in the kernel's scheme: 1 at allocation, plus one on the root
	// from every non-root member of its family; freed at zero.
	refcount atomic.Int64

	// Protected by the root's rwsem:
	numChildren   int                // anon_vmas whose parent this is (plus a self link for a root)
	numActiveVMAs int                // VMAs whose anon_vma this is
	tree          itree.Tree[*Chain] // the chains, keyed by their VMA's page-offset range
}

// ID returns a stable identity, for reports.
func (av *AnonVMA) ID() uint64 { return av.id }

// Root returns the family's root.
func (av *AnonVMA) Root() *AnonVMA { return av.root }

// Lock takes the family's lock for write (anon_vma_lock_write).
func (av *AnonVMA) Lock() { av.root.rwsem.Lock() }

// Unlock releases it.
func (av *AnonVMA) Unlock() { av.root.rwsem.Unlock() }

// RLock takes the family's lock for read (anon_vma_lock_read), as rmap
// walks do.
func (av *AnonVMA) RLock() { av.root.rwsem.RLock() }

// RUnlock releases it.
func (av *AnonVMA) RUnlock() { av.root.rwsem.RUnlock() }

// Sem returns the family's lock, for TakeAll at notifier registration.
func (av *AnonVMA) Sem() *locks.RWSem { return &av.root.rwsem }

// Counts returns the anon_vma's counters (under the family lock).
func (av *AnonVMA) Counts() (children, activeVMAs int, refcount int64) {
	av.RLock()
	defer av.RUnlock()
	return av.numChildren, av.numActiveVMAs, av.refcount.Load()
}

// Chain links one VMA to one anon_vma (struct anon_vma_chain): it sits in
// the anon_vma's tree, keyed by the VMA's page-offset range, and in the
// VMA's list of chains.
type Chain struct {
	VMA     *VMA
	AnonVMA *AnonVMA
	node    itree.Node[*Chain]
}

const pageSize = 4096

func (p *Pool) alloc() *AnonVMA {
	av := &AnonVMA{pool: p, id: p.allocated.Add(1)}
	av.rwsem.Init(locks.ClassAnonVMA)
	av.root, av.parent = av, av
	av.refcount.Store(1)
	p.live.Add(1)
	return av
}

// link puts a new chain between v and av in both lists. Called with av's
// family lock held for write.
func link(v *VMA, av *AnonVMA) {
	c := &Chain{VMA: v, AnonVMA: av}
	c.node = itree.Node[*Chain]{Start: v.PgOff, Last: v.lastIndex(), Value: c}
	av.tree.Insert(&c.node)
	v.chains = append(v.chains, c)
}

// Prepare gives v an anon_vma before its first anonymous page is faulted
// in (anon_vma_prepare): a new root family of its own.
func (p *Pool) Prepare(v *VMA) error {
	if v.AnonVMA != nil {
		return nil
	}
	if v.End <= v.Start {
		return fmt.Errorf("rmap: prepare of empty VMA [%#x, %#x): %w", v.Start, v.End, ErrInvalid)
	}
	av := p.alloc()
	av.Lock()
	link(v, av)
	av.numChildren++ // the self-parent link of a root
	av.numActiveVMAs++
	v.AnonVMA = av
	av.Unlock()
	return nil
}

// PrepareFrom gives v the anon_vma of its neighbour n if n has one and
// was never forked (one chain), instead of a new family
// (find_mergeable_anon_vma): the two can then merge when they meet.
// Otherwise it is Prepare.
func (p *Pool) PrepareFrom(v, n *VMA) error {
	if v.AnonVMA != nil {
		return nil
	}
	if n == nil || n.AnonVMA == nil || len(n.chains) != 1 || v.End <= v.Start {
		return p.Prepare(v)
	}
	av := n.AnonVMA
	av.Lock()
	link(v, av)
	av.numActiveVMAs++
	v.AnonVMA = av
	av.Unlock()
	return nil
}

// Clone links dst to every anon_vma src is linked to (anon_vma_clone):
// for a VMA split off src, or copied from it by mremap, dst starts as a
// copy of src (vm_area_dup), its AnonVMA included, and must have no
// chains yet. If dst has no anon_vma and src has one (Fork), an anon_vma of the
// family that no VMA uses any more and that has at most one child is
// reused as dst's own (never the root), which is what keeps a long chain
// of fork-and-exit from growing without bound.
func (p *Pool) Clone(dst, src *VMA) error {
	if len(dst.chains) != 0 {
		return fmt.Errorf("rmap: clone into a linked VMA: %w", ErrInvalid)
	}
	for _, pc := range src.chains {
		av := pc.AnonVMA
		av.Lock()
		link(dst, av)
		if dst.AnonVMA == nil && src.AnonVMA != nil && av.numChildren < 2 && av.numActiveVMAs == 0 {
			dst.AnonVMA = av
		}
		av.Unlock()
	}
	if dst.AnonVMA != nil {
		dst.AnonVMA.Lock()
		dst.AnonVMA.numActiveVMAs++
		dst.AnonVMA.Unlock()
	}
	return nil
}

// Fork links a child's copy of a VMA into its parent's family
// (anon_vma_fork): the child's VMA joins every anon_vma the parent's is
// linked to, so pages the parent had at fork are found from the child
// too, and gets an anon_vma of its own (or reuses an idle one) for the
// pages it copies on write later, so those are found only from it and its
// own descendants.
func (p *Pool) Fork(child, parent *VMA) error {
	if parent.AnonVMA == nil {
		return nil
	}
	child.AnonVMA = nil
	if err := p.Clone(child, parent); err != nil {
		return err
	}
	if child.AnonVMA != nil {
		return nil // an idle anon_vma of the family was reused
	}
	av := p.alloc()
	av.numActiveVMAs = 1
	av.root = parent.AnonVMA.root
	av.parent = parent.AnonVMA
	av.root.refcount.Add(1) // every member holds its root
	child.AnonVMA = av
	av.Lock()
	link(child, av)
	av.parent.numChildren++
	av.Unlock()
	return nil
}

// Unlink detaches v from every anon_vma (unlink_anon_vmas), freeing those
// no VMA and no child needs any more; a root is freed only after every
// member of its family.
func (p *Pool) Unlink(v *VMA) {
	var empty []*AnonVMA
	var lockedRoot *AnonVMA
	lock := func(av *AnonVMA) {
		if av.root != lockedRoot {
			if lockedRoot != nil {
				lockedRoot.rwsem.Unlock()
			}
			lockedRoot = av.root
			lockedRoot.rwsem.Lock()
		}
	}
	for _, c := range v.chains {
		av := c.AnonVMA
		lock(av)
		av.tree.Remove(&c.node)
		if av.tree.Len() == 0 {
			av.parent.numChildren--
			empty = append(empty, av)
		}
	}
	if v.AnonVMA != nil {
		lock(v.AnonVMA)
		v.AnonVMA.numActiveVMAs--
		v.AnonVMA = nil
	}
	if lockedRoot != nil {
		lockedRoot.rwsem.Unlock()
	}
	v.chains = nil
	// Freed outside the lock: freeing a root needs it.
	for _, av := range empty {
		p.put(av)
	}
}

// put drops a reference (put_anon_vma); the last one frees the anon_vma
// and drops its hold on the root.
func (p *Pool) put(av *AnonVMA) {
	if av.refcount.Add(-1) != 0 {
		return
	}
	root := av.root
	p.free(av)
	if root != av && root.refcount.Add(-1) == 0 {
		p.free(root)
	}
}

func (p *Pool) free(av *AnonVMA) {
	p.live.Add(-1)
	if p.OnFree != nil {
		p.OnFree(av)
	}
}

// VMAsAt yields every VMA whose chain in av's tree covers page offset
// index: the VMAs that may map a page of av at that offset (the heart of
// rmap_walk_anon). The caller holds the family lock (RLock).
func (av *AnonVMA) VMAsAt(index uint64) iter.Seq[*VMA] {
	return func(yield func(*VMA) bool) {
		for n := range av.tree.Overlapping(index, index) {
			if !yield(n.Value.VMA) {
				return
			}
		}
	}
}

// IsAnon reports true: a frame whose mapping is an anon_vma is anonymous
// (PageAnon).
func (av *AnonVMA) IsAnon() bool { return true }

// lockFamily takes av's family lock for read (walks only read), or only
// tries to when try is set; it reports whether the lock is held.
func (av *AnonVMA) lockFamily(try bool) bool {
	s := &av.root.rwsem
	if try {
		return s.TryRLock()
	}
	s.RLock()
	return true
}
