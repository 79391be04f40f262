// Package xpmem is cross-partition memory sharing in the shape of SGI's
// XPMEM: a process exports a range of its address space, and a process
// on another partition of the machine (another OS image, reached over an
// interconnect) maps the exported frames through its own page table.
//
// Kernel counterparts: the out-of-tree XPMEM driver (xpmem_make,
// xpmem_attach, its mmu notifier callbacks), and the mmu-notifier
// threads on sleeping in invalidate_range_start (../shared/threads): a
// remote importer can only be told, and its acknowledgement awaited, by
// messages, so the exporter's start callback must sleep.
//
// # Structure
//
// A Link carries messages between the partitions, each direction in
// order, each message delayed by the link's latency (a goroutine per
// direction: the interconnect). The Exporter serves fault requests (it
// looks the page up with GetUserPage and answers with the frame) and,
// in InvalidateRangeStart, sends an invalidation to the importer and
// sleeps until it is acknowledged. A non-blockable range cannot sleep:
// it is refused with ErrAgain. The Importer maps an attached segment in
// its own page table; a miss sends a fault request and waits for the
// answer.
//
// A fault in flight can lose the race with an invalidation in two ways,
// and each side closes one. The exporter's start callback returns once
// the importer has acknowledged, before the exporter's entry is cleared:
// a look-up in that window would find the old frame, and the
// acknowledgement is already in. So the exporter counts invalidations
// between start and end and a sequence bumped at every end, as KVM does;
// its worker waits while one is in progress and redoes a look-up one
// overlapped. An invalidation that starts after that check sends its
// message before the answer or after it: messages from the exporter
// arrive in order, so either the importer drops what it installed, or it
// has processed the invalidation before the stale answer arrives. The
// importer counts the invalidations it has processed and discards an
// answer if any arrived since it sent the request, and asks again.
//
// # Locks and invariants
//
// The importer's mu guards its page table and counters and ranks below
// every MM lock (nothing is called into an MM with it held). The
// exporter holds no lock while it waits for an acknowledgement.
// Invariant: the importer maps an exported frame only while the
// exporter's page table maps it at the exported address, or before the
// acknowledgement of the invalidation that clears it; the importer's
// page table is registered with the machine's checker.
package xpmem
