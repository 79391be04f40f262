package check_test

import (
	"fmt"
	"testing"

	"github.com/gomm-dev/gomm/internal/check"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeCache holds translations va -> pfn with a fill stamp and a write
// right, in one address space.
type fakeCache struct {
	name    string
	space   uint64
	entries map[uint64]entry
	users   map[uint64]bool
}

type entry struct {
	pfn      uint64
	stamp    check.Stamp
	writable bool
}

func (c *fakeCache) CacheName() string { return c.name }

func (c *fakeCache) CachedPFN(pfn uint64) (string, bool) {
	for va, e := range c.entries {
		if e.pfn == pfn {
			return fmt.Sprintf("va %#x", va), true
		}
	}
	return "", false
}

func (c *fakeCache) StaleTranslations(space, start, end uint64, before check.Stamp, writeOnly bool) []string {
	var out []string
	for va, e := range c.entries {
		if space == c.space && va >= start && va < end && e.stamp < before && (!writeOnly || e.writable) {
			out = append(out, fmt.Sprintf("va %#x", va))
		}
	}
	return out
}

func (c *fakeCache) UsesSpace(space uint64) (string, bool) { return "active", c.users[space] }

// pfnOnly is a cache that only knows frames, like a secondary MMU.
type pfnOnly struct{ pfns map[uint64]bool }

func (p pfnOnly) CacheName() string { return "device" }
func (p pfnOnly) CachedPFN(pfn uint64) (string, bool) {
	return "iotlb", p.pfns[pfn]
}

func TestNilCheckerIsOff(t *testing.T) {
	var c *check.Checker
	c.Register(&fakeCache{})()
	c.FrameFreed(1)
	c.EndDowngrade("munmap", 1, 0, 1, c.BeginDowngrade(), false)
	c.SpaceFreed(1)
	c.Report(check.Violation{})
	assert.Zero(t, c.Now())
	assert.Zero(t, c.Checks())
	v, n := c.Violations()
	assert.Nil(t, v)
	assert.Zero(t, n)
	assert.Nil(t, c.SetHandler(nil))
}

func TestFrameFreed(t *testing.T) {
	c := check.New()
	cpu := &fakeCache{name: "cpu0", space: 1, entries: map[uint64]entry{0x1000: {pfn: 7}}}
	dev := pfnOnly{pfns: map[uint64]bool{9: true}}
	c.Register(cpu)
	unregister := c.Register(dev)
	c.FrameFreed(5)
	_, n := c.Violations()
	assert.Zero(t, n)
	c.FrameFreed(7)
	c.FrameFreed(9)
	v, n := c.Violations()
	require.Equal(t, 2, n)
	assert.Equal(t, check.FreedFrameCached, v[0].Kind)
	assert.Equal(t, "cpu0", v[0].Cache)
	assert.Equal(t, uint64(7), v[0].PFN)
	assert.Equal(t, "device", v[1].Cache)
	assert.Equal(t, "check: frame freed while cached: free: cpu0 still maps pfn 0x7: va 0x1000", v[0].String())
	unregister()
	c.FrameFreed(9)
	_, n = c.Violations()
	assert.Equal(t, 2, n, "an unregistered cache is not asked")
	assert.Equal(t, uint64(4), c.Checks())
}

func TestDowngradeStamps(t *testing.T) {
	c := check.New()
	cpu := &fakeCache{name: "cpu0", space: 1, entries: map[uint64]entry{}}
	c.Register(cpu)
	cpu.entries[0x1000] = entry{pfn: 1, stamp: c.Now(), writable: true}
	cpu.entries[0x2000] = entry{pfn: 2, stamp: c.Now(), writable: false}
	since := c.BeginDowngrade()
	cpu.entries[0x3000] = entry{pfn: 3, stamp: c.Now(), writable: true} // filled during the downgrade

	c.EndDowngrade("mprotect", 1, 0, 0x4000, since, true)
	v, n := c.Violations()
	require.Equal(t, 1, n, "only the old writable entry breaks a write downgrade")
	assert.Contains(t, v[0].String(), "va 0x1000")
	assert.Equal(t, check.StaleAfterDowngrade, v[0].Kind)

	c.EndDowngrade("munmap", 1, 0x2000, 0x3000, since, false)
	_, n = c.Violations()
	assert.Equal(t, 2, n, "any old entry breaks an unmap")
	c.EndDowngrade("munmap", 2, 0, 0x4000, since, false)
	_, n = c.Violations()
	assert.Equal(t, 2, n, "another address space is not concerned")
}

func TestSpaceFreedAndHandler(t *testing.T) {
	c := check.New()
	cpu := &fakeCache{name: "cpu1", users: map[uint64]bool{4: true}}
	c.Register(cpu)
	var seen []check.Violation
	c.SetHandler(func(v check.Violation) { seen = append(seen, v) })
	c.SpaceFreed(3)
	c.SpaceFreed(4)
	require.Len(t, seen, 1)
	assert.Equal(t, check.FreedSpaceInUse, seen[0].Kind)
	assert.Equal(t, "check: address space freed while in use: mmdrop: cpu1 still uses mm 4: active", seen[0].Error())
	c.Report(check.Violation{Kind: check.Other, Op: "custom", Cache: "x"})
	assert.Len(t, seen, 2)
	assert.Equal(t, "invariant violated", check.Other.String())
	assert.Equal(t, "Kind(9)", check.Kind(9).String())
}

func TestRecordIsBounded(t *testing.T) {
	c := check.New()
	for range 1500 {
		c.Report(check.Violation{Kind: check.Other})
	}
	v, n := c.Violations()
	assert.Len(t, v, 1000)
	assert.Equal(t, 1500, n)
}
