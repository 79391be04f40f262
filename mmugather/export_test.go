package mmugather

// SetIgnoreNested switches the concurrent-gather fix off (true) or on, and
// returns a function that restores the previous setting.
func SetIgnoreNested(ignore bool) (restore func()) {
	prev := testIgnoreNested
	testIgnoreNested = ignore
	return func() { testIgnoreNested = prev }
}
