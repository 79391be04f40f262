package xpmem

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/examples/internal/devtlb"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
)

// PageSize is the sharing granule.
const PageSize = gomm.PageSize

// ErrClosed: the segment or the link is gone.
var ErrClosed = errors.New("xpmem: closed")

type msgKind uint8

const (
	faultRequest msgKind = iota
	faultAnswer
	invalidate
	ack
)

type msg struct {
	kind      msgKind
	id        uint64
	lo, hi    uint64 // segment offsets: the page of a fault request, the range of an invalidation
	pfn       uint64 // a fault answer's frame
	err       error
	delivered time.Time // when the interconnect hands it over
}

// Link is the interconnect between two partitions: each direction
// delivers in order, each message after the latency.
type Link struct {
	latency      time.Duration
	toImp, toExp chan msg
	impDone      sync.WaitGroup // the importer-bound wire has stopped
	expDone      sync.WaitGroup // the exporter-bound wire has stopped
}

// NewLink returns a link with the given one-way latency, for one
// segment; the segment starts and stops it.
func NewLink(latency time.Duration) *Link {
	return &Link{latency: latency, toImp: make(chan msg, 1024), toExp: make(chan msg, 1024)}
}

// run delivers in's messages to handle, in order, each no earlier than
// its send time plus the latency: one goroutine per direction, the wire.
func (l *Link) run(in chan msg, done *sync.WaitGroup, handle func(msg)) {
	done.Go(func() {
		for m := range in {
			if d := time.Until(m.delivered); d > 0 {
				time.Sleep(d)
			}
			handle(m)
		}
	})
}

func (l *Link) send(to chan msg, m msg) {
	m.delivered = time.Now().Add(l.latency)
	to <- m
}

// Stats are a segment's counters.
type Stats struct {
	FaultRequests uint64 // sent by the importer
	Discarded     uint64 // answers the importer dropped: an invalidation overtook them
	Retried       uint64 // look-ups the exporter redid: an invalidation ran meanwhile
	Invalidations uint64 // sent by the exporter and acknowledged
	Refused       uint64 // non-blockable invalidations refused with ErrAgain
	Reads         uint64 // importer loads
	// Latencies of the acknowledged invalidations, from the start
	// callback to the acknowledgement.
	Latencies []time.Duration
}

// Segment is an exported range of one MM attached on a remote
// partition: the exporter's side (a notifier subscription and a worker
// that serves fault requests) and the importer's (its page table).
type Segment struct {
	m          *gomm.Machine
	mm         *gomm.MM
	start, len uint64
	link       *Link
	sub        *notifier.Subscription
	work       chan msg // fault requests, for the exporter's worker
	workerDone chan struct{}

	exp struct {
		mu        sync.Mutex
		ended     sync.Cond // signalled when an invalidation ends; L is &mu
		nextID    uint64
		acks      map[uint64]chan struct{}
		latencies []time.Duration
		// Invalidations of the segment between start and end, and a
		// sequence bumped by every end: what the worker checks so that
		// it never answers with a frame an invalidation in progress is
		// taking away (KVM's mmu_invalidate_in_progress and _seq).
		active int
		seq    uint64
	}
	imp struct {
		mu      sync.Mutex
		pt      *devtlb.Table // importer address (a segment offset) -> exporter frame
		gen     uint64        // invalidations processed
		nextID  uint64
		waiting map[uint64]chan msg
		closed  bool
	}
	faultRequests, discarded, retried, invalidations, refused, reads atomic.Uint64

	unregisterCache func()

	// noGenCheck and noActiveCheck switch the importer's and the
	// exporter's stale-answer checks off, for the tests that show what
	// each prevents.
	noGenCheck, noActiveCheck bool
}

// Export makes [start, start+length) of mm available and attaches it on
// the other side of link (xpmem_make and xpmem_attach in one).
func Export(ctx context.Context, m *gomm.Machine, mm *gomm.MM, start, length uint64, link *Link) (*Segment, error) {
	if start%PageSize != 0 || length == 0 || length%PageSize != 0 || start+length > gomm.TaskSize || start+length < start {
		return nil, fmt.Errorf("xpmem: export [%#x, +%#x): %w", start, length, gomm.ErrInvalid)
	}
	s := &Segment{m: m, mm: mm, start: start, len: length, link: link, work: make(chan msg, 256), workerDone: make(chan struct{})}
	s.exp.acks = map[uint64]chan struct{}{}
	s.exp.ended.L = &s.exp.mu
	s.imp.pt = devtlb.NewTable()
	s.imp.waiting = map[uint64]chan msg{}
	sub, err := mm.RegisterNotifier(ctx, (*exporterOps)(s))
	if err != nil {
		return nil, fmt.Errorf("xpmem: %w", err)
	}
	s.sub = sub
	s.unregisterCache = m.RegisterCache((*importerCache)(s))
	link.run(link.toExp, &link.expDone, s.exporterReceive)
	link.run(link.toImp, &link.impDone, s.importerReceive)
	go s.worker()
	return s, nil
}

// Close detaches the importer, unsubscribes the exporter and stops the
// link, in the order that lets every message in flight land: no new
// requests; invalidations still running get their acks; the
// exporter-bound wire drains, so no request reaches the worker after
// it stops; the worker's last answers reach the importer, which drops
// them.
func (s *Segment) Close() error {
	s.imp.mu.Lock()
	s.imp.closed = true
	s.zapLocked(0, s.len)
	for id, ch := range s.imp.waiting {
		delete(s.imp.waiting, id)
		ch <- msg{kind: faultAnswer, err: ErrClosed}
	}
	s.imp.mu.Unlock()
	err := s.mm.UnregisterNotifier(s.sub)
	close(s.link.toExp)
	s.link.expDone.Wait()
	close(s.work)
	<-s.workerDone
	close(s.link.toImp)
	s.link.impDone.Wait()
	s.unregisterCache()
	return err
}

// --- the exporter's partition ---

// exporterReceive handles what arrives from the importer: acks wake the
// invalidation waiting for them; fault requests go to the worker, never
// served on the wire's goroutine (a look-up may wait for mmap_lock,
// held by an munmap that waits for an ack on this same wire).
func (s *Segment) exporterReceive(m msg) {
	switch m.kind {
	case ack:
		s.exp.mu.Lock()
		ch := s.exp.acks[m.id]
		delete(s.exp.acks, m.id)
		s.exp.mu.Unlock()
		if ch != nil {
			close(ch)
		}
	case faultRequest:
		s.work <- m
	}
}

// worker serves fault requests.
func (s *Segment) worker() {
	defer close(s.workerDone)
	for m := range s.work {
		s.answer(m)
	}
}

// answer looks the page of a fault request up and answers with its
// frame, then drops the reference: the invalidation protocol, not a pin,
// keeps the importer honest. The look-up waits for invalidations in
// progress and is redone if one ran meanwhile: an invalidation whose
// start has returned may not have cleared the exporter's entry yet, and
// its acknowledgement is already in, so the importer could not discard
// an answer taken from that entry.
func (s *Segment) answer(m msg) {
	for {
		s.exp.mu.Lock()
		for s.exp.active > 0 && !s.noActiveCheck {
			s.exp.ended.Wait()
		}
		seq := s.exp.seq
		s.exp.mu.Unlock()

		ans := msg{kind: faultAnswer, id: m.id}
		f, err := s.mm.GetUserPage(s.start+m.lo, false) // the importer only reads
		if err != nil {
			ans.err = err
		} else {
			ans.pfn = uint64(f.PFN())
		}
		s.exp.mu.Lock()
		stale := s.exp.active > 0 || s.exp.seq != seq
		s.exp.mu.Unlock()
		if !stale || s.noActiveCheck {
			// An invalidation that starts from here on sends its message
			// before this answer or after it: before, the importer
			// discards the answer; after, it drops what it installed.
			s.link.send(s.link.toImp, ans)
		}
		if f != nil {
			_ = s.m.RAM().Put(f)
		}
		if !stale || s.noActiveCheck {
			return
		}
		s.retried.Add(1)
	}
}

type exporterOps Segment

// InvalidateRangeStart tells the importer and sleeps until it
// acknowledges; a non-blockable range is refused with ErrAgain.
func (o *exporterOps) InvalidateRangeStart(r *notifier.Range) error {
	s := (*Segment)(o)
	lo, hi := max(r.Start, s.start), min(r.End, s.start+s.len)
	if lo >= hi {
		return nil
	}
	if !r.Blockable() {
		s.refused.Add(1)
		return fmt.Errorf("xpmem: invalidation of [%#x, %#x) must message a remote partition: %w", lo, hi, gomm.ErrAgain)
	}
	s.exp.mu.Lock()
	s.exp.active++
	s.exp.mu.Unlock()
	s.invalidateRemote(lo-s.start, hi-s.start)
	return nil
}

// InvalidateRangeEnd lets fault answers go again; the importer refaults
// on demand.
func (o *exporterOps) InvalidateRangeEnd(r *notifier.Range) {
	s := (*Segment)(o)
	if max(r.Start, s.start) >= min(r.End, s.start+s.len) {
		return // its start did not count it
	}
	s.exp.mu.Lock()
	s.exp.active--
	s.exp.seq++
	s.exp.mu.Unlock()
	s.exp.ended.Broadcast()
}

// Release tells the importer the whole segment is gone.
func (o *exporterOps) Release(notifier.MM) {
	s := (*Segment)(o)
	s.invalidateRemote(0, s.len)
}

func (s *Segment) invalidateRemote(lo, hi uint64) {
	t0 := time.Now()
	s.exp.mu.Lock()
	s.exp.nextID++
	id := s.exp.nextID
	ch := make(chan struct{})
	s.exp.acks[id] = ch
	s.exp.mu.Unlock()
	s.link.send(s.link.toImp, msg{kind: invalidate, id: id, lo: lo, hi: hi})
	<-ch
	s.invalidations.Add(1)
	s.exp.mu.Lock()
	s.exp.latencies = append(s.exp.latencies, time.Since(t0))
	s.exp.mu.Unlock()
}

// --- the importer's partition ---

func (s *Segment) importerReceive(m msg) {
	switch m.kind {
	case invalidate:
		s.imp.mu.Lock()
		s.zapLocked(m.lo, m.hi)
		s.imp.gen++
		s.imp.mu.Unlock()
		s.link.send(s.link.toExp, msg{kind: ack, id: m.id})
	case faultAnswer:
		s.imp.mu.Lock()
		ch := s.imp.waiting[m.id]
		delete(s.imp.waiting, m.id)
		s.imp.mu.Unlock()
		if ch != nil {
			ch <- m
		}
	}
}

// zapLocked drops the importer's mappings of [lo, hi). Called with
// imp.mu held.
func (s *Segment) zapLocked(lo, hi uint64) {
	s.imp.pt.Unmap(lo, hi)
}

// Read64 is an importer load of the word at segment offset off.
func (s *Segment) Read64(off uint64) (uint64, error) {
	if off%8 != 0 || off >= s.len {
		return 0, fmt.Errorf("xpmem: read at offset %#x: %w", off, gomm.ErrInvalid)
	}
	page := off &^ (PageSize - 1)
	for {
		s.imp.mu.Lock()
		if s.imp.closed {
			s.imp.mu.Unlock()
			return 0, ErrClosed
		}
		if e := s.imp.pt.Lookup(page); e.IsPresent() {
			f, err := s.m.RAM().Frame(physmem.PFN(e.PFN()))
			var v uint64
			if err == nil {
				v, err = f.Load64(int(off - page))
			}
			s.imp.mu.Unlock()
			s.reads.Add(1)
			return v, err
		}
		gen := s.imp.gen
		s.imp.nextID++
		id := s.imp.nextID
		ch := make(chan msg, 1)
		s.imp.waiting[id] = ch
		s.imp.mu.Unlock()

		s.faultRequests.Add(1)
		s.link.send(s.link.toExp, msg{kind: faultRequest, id: id, lo: page})
		ans := <-ch
		if ans.err != nil {
			return 0, fmt.Errorf("xpmem: remote fault at offset %#x: %w", page, ans.err)
		}
		s.imp.mu.Lock()
		if s.imp.gen != gen && !s.noGenCheck {
			// An invalidation arrived after the request left: the answer
			// may name a frame the exporter has since unmapped.
			s.discarded.Add(1)
		} else if !s.imp.closed {
			_, _ = s.imp.pt.Install(page, pagetable.NewPTE(ans.pfn, pagetable.User))
		}
		s.imp.mu.Unlock()
	}
}

// Stats returns the segment's counters.
func (s *Segment) Stats() Stats {
	s.exp.mu.Lock()
	lat := slices.Clone(s.exp.latencies)
	s.exp.mu.Unlock()
	return Stats{FaultRequests: s.faultRequests.Load(), Discarded: s.discarded.Load(), Retried: s.retried.Load(),
		Invalidations: s.invalidations.Load(), Refused: s.refused.Load(), Reads: s.reads.Load(), Latencies: lat}
}

// importerCache is the importer's page table as the checker sees it.
type importerCache Segment

func (c *importerCache) CacheName() string { return "xpmem importer page table" }

func (c *importerCache) CachedPFN(pfn uint64) (string, bool) {
	s := (*Segment)(c)
	s.imp.mu.Lock()
	defer s.imp.mu.Unlock()
	return s.imp.pt.Cached(pfn)
}
