package tlb

// BumpGen advances ctx's TLB generation as a concurrent flusher would
// between bumping it and delivering its IPIs: CPUs then see a request
// they have not handled yet.
func BumpGen(ctx *Context) { ctx.gen.Add(1) }
