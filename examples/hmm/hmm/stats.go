package hmm

import "sync/atomic"

// Stats are a device's counters, over all its mirrors.
type Stats struct {
	Reads, Writes  uint64 // device accesses through a mirror
	Faults         uint64 // RangeFault calls to fill a mirror
	Retries        uint64 // snapshots thrown away because an invalidation overtook them
	Invalidations  uint64 // invalidations that reached a mirror and dropped its translations
	OwnSkipped     uint64 // invalidations of the device's own migrations and claims, skipped
	ToDevice       uint64 // pages migrated to device memory
	ToRAM          uint64 // pages migrated back to RAM
	CPUFaults      uint64 // CPU faults on device memory (MigrateToRAM calls)
	Exclusive      uint64 // exclusive claims granted
	Revoked        uint64 // exclusive translations dropped by an invalidation (a CPU took the page back)
	Atomics        uint64 // device atomics done
	DevicePagesUse int    // device pages handed out now
}

type counters struct {
	reads, writes, faults, retries, invalidations, ownSkipped atomic.Uint64
	toDevice, toRAM, cpuFaults, exclusive, revoked, atomics   atomic.Uint64
}

// Stats returns a snapshot of the device's counters.
func (d *Device) Stats() Stats {
	c := &d.stats
	return Stats{
		Reads: c.reads.Load(), Writes: c.writes.Load(), Faults: c.faults.Load(), Retries: c.retries.Load(),
		Invalidations: c.invalidations.Load(), OwnSkipped: c.ownSkipped.Load(),
		ToDevice: c.toDevice.Load(), ToRAM: c.toRAM.Load(), CPUFaults: c.cpuFaults.Load(),
		Exclusive: c.exclusive.Load(), Revoked: c.revoked.Load(), Atomics: c.atomics.Load(),
		DevicePagesUse: d.pagemap.InUse(),
	}
}
