package locks

import "fmt"

// Class is a lock class in the lockdep sense: every lock of one kind (every
// mm's mmap_lock, every PTE table's ptlock) shares one Class, and the lock
// order is declared between classes, not between lock instances.
//
// A lock must be taken after every lock of lower rank that its goroutine
// holds and before any of higher rank. Two locks of the same class may only
// be held together when the second is taken with an explicit nesting
// subclass (LockNested) or by TakeAll.
type Class struct {
	name string
	rank int
}

// NewClass declares a lock class. Drivers that add their own locks declare
// them with a rank that places them in the gomm order below; ranks are
// compared only, so leave gaps.
func NewClass(name string, rank int) *Class {
	return &Class{name: name, rank: rank}
}

// Name returns the class name used in lockdep reports.
func (c *Class) Name() string {
	if c == nil {
		return "<unclassed>"
	}
	return c.name
}

// Rank returns the class's place in the lock order: lower ranks are taken
// first.
func (c *Class) Rank() int { return c.rank }

func (c *Class) String() string {
	if c == nil {
		return "<unclassed>"
	}
	return fmt.Sprintf("%s(rank %d)", c.name, c.rank)
}

// The gomm lock order, outermost first. This is the single place it is
// declared; it follows the comment at the top of the kernel's mm/rmap.c:
//
//	i_rwsem (a file's inode lock: writes, truncation)
//	mmap_lock
//	  mm_all_locks_mutex (mm_take_all_locks)
//	    page lock
//	      i_mmap_rwsem
//	        anon_vma->rwsem (always the root's)
//	          mm->page_table_lock
//	            pmd lock (split PMD lock)
//	              ptlock (split PTE-table lock)
//
// Below all of these sits a simulated CPU's access lock (package tlb), a
// leaf under which no lock is ever taken, so it is not a class here.
var (
	ClassInodeRWSem    = NewClass("i_rwsem", 90)
	ClassMmapLock      = NewClass("mmap_lock", 100)
	ClassTakeAllMutex  = NewClass("mm_all_locks_mutex", 150)
	ClassPageLock      = NewClass("page_lock", 200)
	ClassIMmapRWSem    = NewClass("i_mmap_rwsem", 300)
	ClassAnonVMA       = NewClass("anon_vma", 400)
	ClassPageTableLock = NewClass("page_table_lock", 500)
	ClassPMDLock       = NewClass("pmd_lock", 550)
	ClassPTLock        = NewClass("ptlock", 600)
)
