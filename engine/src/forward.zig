//! The forward pass over a ragged batch, top to bottom as llama2.c's run.c reads:
//! embed; per layer [norm, qkv, RoPE, write K/V to the paged cache, attention,
//! out projection, residual, norm, SwiGLU, down projection, residual]; final norm
//! and LM head for the sampled rows only; sampling.

const std = @import("std");
const assert = std.debug.assert;
const abi = @import("abi.zig");
const kernels = @import("kernels.zig");
const quant = @import("quant.zig");
const bgemm = @import("bgemm.zig");
const qgemm = @import("qgemm.zig");
const sampler = @import("sampler.zig");
const Matrix = kernels.Matrix;
const CpuBackend = @import("cpu_backend.zig").CpuBackend;
const KvType = @import("cpu_backend.zig").KvType;
const awaitMasks = @import("batch.zig").awaitMasks;
const thread_pool = @import("thread_pool.zig");
const ThreadPool = thread_pool.ThreadPool;

pub const Scratch = struct {
    x: []f32, // (max_tokens, hidden) the residual stream
    xb: []f32, // (max_tokens, hidden) normed input of a sub-block
    xb2: []f32, // (max_tokens, hidden) output of a sub-block, before the residual add
    qkv: []f32, // (max_tokens, q_dim + 2 * kv_dim)
    att: []f32, // (max_tokens, q_dim)
    gate_up: []f32, // (max_tokens, 2 * intermediate)
    h: []f32, // (max_tokens, intermediate)
    xs: []f32, // (max_seqs, hidden) final-normed rows that are sampled
    scores: []f32, // (threads, heads per KV head, max_position + vec_len)
    probs: []f32, // (threads, vocab)
    order: []u32, // (threads, vocab)
    counts: []u32, // (threads, vocab) zero between uses
    raw: []f32, // (threads, vocab)
    seq_of_token: []u32, // (max_tokens) which sequence of the batch each token belongs to
    tiles: []Tile, // (max_tokens) the step's attention work: a decode token, or a prefill tile
    tile_m: []f32, // (threads, tile_queries * heads per KV head): attendTile's running maxima
    tile_l: []f32, // the same: its sums of exponentials
    tile_acc: []f32, // (threads, tile_queries * heads per KV head, head_dim): its weighted sums
    tile_scores: []f32, // (threads, heads per KV head, tile_chunk + vec_len): one query's scores over a chunk
    acts_q: []i8, // (max_tokens, widest) activations quantized to 8 bits, for quantized weights
    acts_scale: []f32, // (max_tokens, widest / 32)
    acts_sum: []f32, // (max_tokens, widest / 32)
    acts_sum_lo: []f32, // (max_tokens, widest / 32)
    acts_bf16: []u16, // (max_tokens, widest) activations in bf16, for bf16 compute (else empty)

    pub fn init(allocator: std.mem.Allocator, m: abi.ModelConfig, c: abi.EngineConfig) !Scratch {
        const t: usize = c.max_num_batched_tokens;
        const q_dim = @as(usize, m.num_heads) * m.head_dim;
        const kv_dim = @as(usize, m.num_kv_heads) * m.head_dim;
        const threads: usize = c.cpu.num_threads;
        var s: Scratch = undefined;
        inline for (.{
            .{ "x", t * m.hidden_size },
            .{ "xb", t * m.hidden_size },
            .{ "xb2", t * m.hidden_size },
            .{ "qkv", t * (q_dim + 2 * kv_dim) },
            .{ "att", t * q_dim },
            .{ "gate_up", t * 2 * @as(usize, m.intermediate_size) },
            .{ "h", t * m.intermediate_size },
            .{ "xs", @as(usize, c.max_num_seqs) * m.hidden_size },
            .{ "scores", threads * (m.max_position + kernels.vec_len) * (m.num_heads / m.num_kv_heads) },
            .{ "tile_m", threads * kernels.tile_queries * (m.num_heads / m.num_kv_heads) },
            .{ "tile_l", threads * kernels.tile_queries * (m.num_heads / m.num_kv_heads) },
            .{ "tile_acc", threads * kernels.tile_queries * (m.num_heads / m.num_kv_heads) * @as(usize, m.head_dim) },
            .{ "tile_scores", threads * (kernels.tile_chunk + kernels.vec_len) * (m.num_heads / m.num_kv_heads) },
            .{ "probs", threads * m.vocab_size },
            .{ "raw", threads * m.vocab_size },
        }) |field| @field(s, field[0]) = try allocator.alloc(f32, field[1]);
        s.order = try allocator.alloc(u32, threads * m.vocab_size);
        s.counts = try allocator.alloc(u32, threads * m.vocab_size);
        @memset(s.counts, 0);
        s.seq_of_token = try allocator.alloc(u32, t);
        s.tiles = try allocator.alloc(Tile, t);
        const w = std.mem.alignForward(usize, widest(m), 32);
        s.acts_q = try allocator.alloc(i8, t * w);
        s.acts_scale = try allocator.alloc(f32, t * w / 32);
        s.acts_sum = try allocator.alloc(f32, t * w / 32);
        s.acts_sum_lo = try allocator.alloc(f32, t * w / 32);
        s.acts_bf16 = try allocator.alloc(u16, if (c.cpu.compute_dtype == @intFromEnum(abi.DType.bf16)) t * w else 0);
        return s;
    }

    fn widest(m: abi.ModelConfig) usize {
        return @max(@max(m.hidden_size, m.intermediate_size), m.num_heads * m.head_dim);
    }

    pub fn deinit(s: *Scratch, allocator: std.mem.Allocator) void {
        inline for (.{ "x", "xb", "xb2", "qkv", "att", "gate_up", "h", "xs", "scores", "probs", "raw", "tile_m", "tile_l", "tile_acc", "tile_scores" }) |name| allocator.free(@field(s, name));
        allocator.free(s.tiles);
        allocator.free(s.order);
        allocator.free(s.counts);
        allocator.free(s.seq_of_token);
        allocator.free(s.acts_q);
        allocator.free(s.acts_scale);
        allocator.free(s.acts_sum);
        allocator.free(s.acts_sum_lo);
        allocator.free(s.acts_bf16);
    }
};

/// Runs `body(ctx, thread_index, begin, end)` over [0, n_items) on the pool.
fn parallel(pool: *ThreadPool, n_items: usize, ctx: anytype, comptime body: fn (@TypeOf(ctx), usize, usize, usize) void) void {
    parallelAligned(pool, n_items, 1, 16, .guided, ctx, body);
}

/// As `parallel`, with chunks a multiple of `alignment` items (matmul row tiles), the
/// smallest about 1/(threads * min_chunks) of the whole.
fn parallelAligned(pool: *ThreadPool, n_items: usize, alignment: usize, min_chunks: usize, split: thread_pool.Split, ctx: anytype, comptime body: fn (@TypeOf(ctx), usize, usize, usize) void) void {
    const Ctx = @TypeOf(ctx);
    const Wrapper = struct {
        fn call(p: *const anyopaque, thread_index: usize, begin: usize, end: usize) void {
            const c: *const Ctx = @ptrCast(@alignCast(p));
            body(c.*, thread_index, begin, end);
        }
    };
    // The pool hands out chunks of whole grains (how: `split`): threads finish within a
    // grain of each other.
    const grain = std.mem.alignForward(usize, @max(1, n_items / (pool.numThreads() * min_chunks)), alignment);
    pool.run(.{ .func = Wrapper.call, .ctx = &ctx, .n_items = n_items, .grain = grain, .split = split });
}

/// One matmul job over the concatenated rows of several matrices that read the same
/// input: out[n, offset_i + r] = x[n] . w_i[r].
const MatmulCtx = struct {
    out: []f32,
    out_stride: usize,
    x: []const f32,
    n_tokens: usize,
    ws: []const Matrix,
    acts: kernels.Acts,

    fn body(c: MatmulCtx, _: usize, begin: usize, end: usize) void {
        var offset: usize = 0;
        for (c.ws) |w| {
            const lo = @max(begin, offset);
            const hi = @min(end, offset + w.rows);
            if (lo < hi) kernels.matmulRows(c.out[offset..], c.out_stride, c.x, c.n_tokens, w, lo - offset, hi - offset, c.acts);
            offset += w.rows;
        }
    }
};

/// Tokens [begin, end) of x quantized to 8 bits, or rounded to bf16.
const ConvertCtx = struct {
    q8: ?quant.QuantActs,
    bf16: ?[]u16,
    x: []const f32,
    cols: usize,

    fn body(c: ConvertCtx, _: usize, begin: usize, end: usize) void {
        if (c.q8) |a| a.quantize(c.x, begin, end, c.cols);
        if (c.bf16) |a| bgemm.convertActs(a, c.x, begin, end, c.cols);
    }
};

fn matmul(e: *CpuBackend, out: []f32, x: []const f32, n_tokens: usize, ws: []const Matrix) void {
    var total_rows: usize = 0;
    var int_dot = false;
    var bf16_products = false;
    var packed_weights = false;
    for (ws) |w| {
        total_rows += w.rows;
        int_dot = int_dot or w.layout == .int_groups;
        bf16_products = bf16_products or w.layout == .bf16_groups;
        packed_weights = packed_weights or w.layout != .plain;
    }
    // The input converted once for every row: quantized to 8 bits for packed quantized
    // weights (llama.cpp's Q8 activations, met in integer products), rounded to bf16 for
    // float weights packed for bf16 products.
    const cols = ws[0].cols;
    const shared = n_tokens >= kernels.tile_tokens; // several tokens meet each weight tile
    const convert = ConvertCtx{
        .q8 = if (int_dot) .{ .q = e.scratch.acts_q, .scale = e.scratch.acts_scale, .sum = e.scratch.acts_sum, .sum_lo = e.scratch.acts_sum_lo } else null,
        .bf16 = if (bf16_products) e.scratch.acts_bf16 else null,
        .x = x,
        .cols = cols,
    };
    // A decode step's token or few are converted here: waking the pool would cost more.
    if (convert.q8 != null or convert.bf16 != null) {
        if (shared) parallel(&e.threads, n_tokens, convert, ConvertCtx.body) else convert.body(0, 0, n_tokens);
    }
    const acts = kernels.Acts{ .q8 = convert.q8, .bf16 = convert.bf16 };
    const ctx = MatmulCtx{
        .acts = acts,
        .out = out,
        .out_stride = total_rows,
        .x = x,
        .n_tokens = n_tokens,
        .ws = ws,
    };
    if (shared) {
        // A prefill's chunk is its cache blocking: coarse, handed out guided. The packed
        // GEMMs take rows in groups of 16: chunks of whole groups.
        parallelAligned(&e.threads, total_rows, if (packed_weights) qgemm.group_rows else kernels.tile_rows, 16, .guided, ctx, MatmulCtx.body);
    } else {
        // A decode's product streams its weights once: each thread reads its own contiguous
        // share in long runs, and a thread that is done takes grains (1/128 of the rows,
        // whole tiles) from the end of another's, so that they finish close together.
        // 1B q4_0, step time, alternating: 13.9-14.6 ms with guided chunks of single
        // groups, 13.0-13.8 like this.
        parallelAligned(&e.threads, total_rows, if (packed_weights) qgemm.stream_tile_rows else kernels.tile_rows, 64, .owned, ctx, MatmulCtx.body);
    }
}

/// Consecutive query tokens of one sequence that attend together: one (a decode) or up to
/// kernels.tile_queries of a prefill chunk.
pub const Tile = struct { first: u32, n: u32 };

/// The step's tokens as tiles: each sequence's run of query tokens cut into pieces of at most
/// tile_queries (their positions are consecutive). Returns how many.
fn makeTiles(b: abi.Batch, tiles: []Tile) usize {
    var count: usize = 0;
    for (0..b.num_seqs) |seq| {
        var t: usize = @intCast(b.query_start_loc[seq]);
        const end: usize = @intCast(b.query_start_loc[seq + 1]);
        while (t < end) : (t += kernels.tile_queries) {
            tiles[count] = .{ .first = @intCast(t), .n = @intCast(@min(kernels.tile_queries, end - t)) };
            count += 1;
        }
    }
    return count;
}

const AttentionCtx = struct {
    e: *CpuBackend,
    layer: usize,
    seq_of_token: []const u32,
    tiles: []const Tile,

    fn body(c: AttentionCtx, thread_index: usize, begin: usize, end: usize) void {
        switch (c.e.kv_dtype) {
            inline .f32, .f16 => |t| c.attend(KvType(t), thread_index, begin, end),
            else => unreachable, // refused at create
        }
    }

    /// Items are (tile, KV head) pairs: the query heads of a group share their K/V reads, and a
    /// prefill tile's queries share them too.
    fn attend(c: AttentionCtx, comptime KV: type, thread_index: usize, begin: usize, end: usize) void {
        const e = c.e;
        const m = e.model;
        const b = e.batch.*;
        const head_dim: usize = m.head_dim;
        const q_dim = @as(usize, m.num_heads) * head_dim;
        const qkv_dim = q_dim + 2 * @as(usize, m.num_kv_heads) * head_dim;
        const group = m.num_heads / m.num_kv_heads;
        const layout = e.kvLayout();
        const k_cache = e.kvLayer(KV, e.k_cache, c.layer);
        const v_cache = e.kvLayer(KV, e.v_cache, c.layer);
        const scores_len = group * (@as(usize, m.max_position) + kernels.vec_len);
        const scores = e.scratch.scores[thread_index * scores_len ..][0..scores_len];
        const tile_rows = kernels.tile_queries * group;
        const chunk_len = group * (kernels.tile_chunk + kernels.vec_len);
        const work = kernels.TileScratch{
            .m = e.scratch.tile_m[thread_index * tile_rows ..][0..tile_rows],
            .l = e.scratch.tile_l[thread_index * tile_rows ..][0..tile_rows],
            .acc = e.scratch.tile_acc[thread_index * tile_rows * head_dim ..][0 .. tile_rows * head_dim],
            .scores = e.scratch.tile_scores[thread_index * chunk_len ..][0..chunk_len],
        };
        const bs: usize = e.config.block_size;
        const window: usize = if (e.isLocal(c.layer)) m.sliding_window else 0;
        for (begin..end) |item| {
            const tile = c.tiles[item / m.num_kv_heads];
            const kv_head = item % m.num_kv_heads;
            const t: usize = tile.first;
            const seq = c.seq_of_token[t];
            const row = b.block_tables[seq * e.config.max_blocks_per_seq ..][0..e.config.max_blocks_per_seq];
            const heads = kv_head * group * head_dim;
            const pos: usize = @intCast(b.positions[t]);
            if (tile.n > 1) {
                kernels.attendTile(KV, e.scratch.att[t * q_dim + heads ..], q_dim, e.scratch.qkv[t * qkv_dim + heads ..], qkv_dim, tile.n, group, k_cache, v_cache, layout, kv_head, row, pos, window, e.score_shape, work);
                continue;
            }
            // A decode token: one pass of scores over the context, then the weighted sum of V.
            // A local layer reads from the block where its window starts; the positions of that
            // block before the window are masked.
            const context_len = pos + 1;
            const start = kernels.windowStart(pos, window);
            const first_block = start / bs;
            var shape = e.score_shape;
            shape.masked = start - first_block * bs;
            kernels.attendGroup(
                KV,
                e.scratch.att[t * q_dim + heads ..][0 .. group * head_dim],
                e.scratch.qkv[t * qkv_dim + heads ..][0 .. group * head_dim],
                group,
                k_cache,
                v_cache,
                layout,
                kv_head,
                row[first_block..],
                context_len - first_block * bs,
                scores,
                shape,
            );
        }
    }
};

const SampleCtx = struct {
    e: *CpuBackend,

    fn body(c: SampleCtx, thread_index: usize, begin: usize, end: usize) void {
        const e = c.e;
        const vocab: usize = e.model.vocab_size;
        const b = e.batch.*;
        const scratch = sampler.Scratch{
            .probs = e.scratch.probs[thread_index * vocab ..][0..vocab],
            .order = e.scratch.order[thread_index * vocab ..][0..vocab],
            .counts = e.scratch.counts[thread_index * vocab ..][0..vocab],
            .raw = e.scratch.raw[thread_index * vocab ..][0..vocab],
        };
        const k_max = abi.top_logprobs_max;
        for (begin..end) |i| {
            const p = b.sampling[i];
            const bias_offset: usize = @intCast(p.bias_offset);
            const slot: ?usize = if (p.state_slot >= 0) @intCast(p.state_slot) else null;
            const row = sampler.Row{
                .params = p,
                .history = if (slot) |st| e.seq_state.history(st) else &.{},
                .prompt_len = if (slot) |st| e.seq_state.prompt_len[st] else 0,
                .bias_ids = b.logit_bias_ids[bias_offset..][0..@intCast(p.bias_count)],
                .bias_values = b.logit_bias_values[bias_offset..][0..@intCast(p.bias_count)],
                .mask = if (p.use_mask == 1) b.allowed_token_mask[i * b.mask_words ..][0..b.mask_words] else null,
            };
            const s = sampler.sample(b.logits[i * vocab ..][0..vocab], row, scratch, b.out_top_ids[i * k_max ..][0..k_max], b.out_top_logprobs[i * k_max ..][0..k_max]);
            b.out_token_ids[i] = @intCast(s.token_id);
            b.out_logprobs[i] = s.logprob;
            if (slot) |st| e.seq_state.append(st, @intCast(s.token_id));
        }
    }
};

/// The per-token work between matmuls, split over tokens: norms, RoPE and the KV write,
/// residual adds, SwiGLU. Each phase reads and writes only its own tokens' rows.
const TokenCtx = struct {
    e: *CpuBackend,
    layer: usize,
    phase: enum { attn_norm, rope_kv, residual_ffn_norm, silu, residual },

    fn body(c: TokenCtx, _: usize, begin: usize, end: usize) void {
        const e = c.e;
        const m = e.model;
        const s = &e.scratch;
        const layer = e.weights.layers[c.layer];
        const hidden: usize = m.hidden_size;
        for (begin..end) |t| {
            const x = s.x[t * hidden ..][0..hidden];
            switch (c.phase) {
                .attn_norm => kernels.rmsnorm(s.xb[t * hidden ..][0..hidden], x, layer.attn_norm, m.rms_norm_eps),
                .rope_kv => ropeAndStore(e, c.layer, t),
                .residual_ffn_norm => {
                    addResidual(x, s.xb2[t * hidden ..][0..hidden], layer.attn_post_norm, m.rms_norm_eps);
                    kernels.rmsnorm(s.xb[t * hidden ..][0..hidden], x, layer.ffn_norm, m.rms_norm_eps);
                },
                .silu => {
                    const ffn: usize = m.intermediate_size;
                    const gate_up = s.gate_up[t * 2 * ffn ..][0 .. 2 * ffn];
                    if (m.hidden_act == 1)
                        kernels.geluMul(s.h[t * ffn ..][0..ffn], gate_up[0..ffn], gate_up[ffn..])
                    else
                        kernels.siluMul(s.h[t * ffn ..][0..ffn], gate_up[0..ffn], gate_up[ffn..]);
                },
                .residual => addResidual(x, s.xb2[t * hidden ..][0..hidden], layer.ffn_post_norm, m.rms_norm_eps),
            }
        }
    }
};

/// x += d, or x += RMSNorm(d) where the layer normalizes a sub-block's output (Gemma).
fn addResidual(x: []f32, d: []f32, post_norm: ?kernels.Matrix, eps: f32) void {
    if (post_norm) |w| kernels.rmsnorm(d, d, w, eps);
    for (x, d) |*v, a| v.* += a;
}

/// RoPE on token t's q and k heads, then its K and V into the cache at its slot.
fn ropeAndStore(e: *CpuBackend, l: usize, t: usize) void {
    const m = e.model;
    const b = e.batch.*;
    const head_dim: usize = m.head_dim;
    const half = head_dim / 2;
    const q_dim = @as(usize, m.num_heads) * head_dim;
    const kv_dim = @as(usize, m.num_kv_heads) * head_dim;
    const qkv_dim = q_dim + 2 * kv_dim;
    const interleaved = m.rope_interleaved != 0;
    const pos: usize = @intCast(b.positions[t]);
    const local = e.rope_local_cos.len > 0 and e.isLocal(l);
    const cos = (if (local) e.rope_local_cos else e.rope_cos)[pos * half ..][0..half];
    const sin = (if (local) e.rope_local_sin else e.rope_sin)[pos * half ..][0..half];
    const row = e.scratch.qkv[t * qkv_dim ..][0..qkv_dim];
    const layer = e.weights.layers[l];
    if (layer.qkv_bias) |bias| for (row, bias) |*v, add| {
        v.* += add;
    };
    // Qwen 3's and Gemma 3's RMSNorm over each q and k head, in place.
    if (layer.q_norm) |w| for (0..m.num_heads) |h| {
        const head = row[h * head_dim ..][0..head_dim];
        kernels.rmsnorm(head, head, w, m.rms_norm_eps);
    };
    if (layer.k_norm) |w| for (0..m.num_kv_heads) |h| {
        const head = row[q_dim + h * head_dim ..][0..head_dim];
        kernels.rmsnorm(head, head, w, m.rms_norm_eps);
    };
    for (0..m.num_heads) |h| kernels.rope(row[h * head_dim ..][0..head_dim], cos, sin, interleaved);
    for (0..m.num_kv_heads) |h| kernels.rope(row[q_dim + h * head_dim ..][0..head_dim], cos, sin, interleaved);
    const slot: usize = @intCast(b.slot_mapping[t]);
    switch (e.kv_dtype) {
        inline .f32, .f16 => |dt| {
            const KV = KvType(dt);
            const k = row[q_dim..][0..kv_dim];
            const v = row[q_dim + kv_dim ..][0..kv_dim];
            kernels.storeKv(KV, e.kvLayout(), e.kvLayer(KV, e.k_cache, l), e.kvLayer(KV, e.v_cache, l), slot, k, v);
        },
        else => unreachable,
    }
}

/// The forward pass and sampling of the step in e.batch. Sampling waits for the caller's
/// masks when they are still being written (structured output), so they are made while
/// the matmuls run.
pub fn run(e: *CpuBackend) abi.Status {
    const m = e.model;
    const b = e.batch.*;
    const s = &e.scratch;
    const pool = &e.threads;
    const n: usize = b.num_tokens;
    const hidden: usize = m.hidden_size;

    const seq_of_token = s.seq_of_token[0..n];
    for (0..b.num_seqs) |seq| {
        const begin: usize = @intCast(b.query_start_loc[seq]);
        const end: usize = @intCast(b.query_start_loc[seq + 1]);
        for (begin..end) |t| seq_of_token[t] = @intCast(seq);
    }

    const n_tiles = makeTiles(b, s.tiles);

    // x = token embeddings
    for (0..n) |t| {
        const row: usize = @intCast(b.token_ids[t]);
        e.weights.token_embd.readRow(s.x[t * hidden ..][0..hidden], row);
        if (m.embedding_scale != 0) for (s.x[t * hidden ..][0..hidden]) |*v| {
            v.* *= m.embedding_scale;
        };
    }

    for (e.weights.layers, 0..) |layer, l| {
        parallel(pool, n, TokenCtx{ .e = e, .layer = l, .phase = .attn_norm }, TokenCtx.body);
        matmul(e, s.qkv, s.xb, n, &.{ layer.wq, layer.wk, layer.wv });
        parallel(pool, n, TokenCtx{ .e = e, .layer = l, .phase = .rope_kv }, TokenCtx.body);
        parallel(pool, n_tiles * m.num_kv_heads, AttentionCtx{ .e = e, .layer = l, .seq_of_token = seq_of_token, .tiles = s.tiles[0..n_tiles] }, AttentionCtx.body);
        matmul(e, s.xb2, s.att, n, &.{layer.wo});
        parallel(pool, n, TokenCtx{ .e = e, .layer = l, .phase = .residual_ffn_norm }, TokenCtx.body);
        matmul(e, s.gate_up, s.xb, n, &.{ layer.w_gate, layer.w_up });
        parallel(pool, n, TokenCtx{ .e = e, .layer = l, .phase = .silu }, TokenCtx.body);
        matmul(e, s.xb2, s.h, n, &.{layer.w_down});
        parallel(pool, n, TokenCtx{ .e = e, .layer = l, .phase = .residual }, TokenCtx.body);
    }

    // Only the rows that are sampled go through the final norm and the LM head.
    const n_samples: usize = b.num_samples;
    if (n_samples == 0) return .ok;
    for (0..n_samples) |i| {
        const t: usize = @intCast(b.sample_indices[i]);
        kernels.rmsnorm(s.xs[i * hidden ..][0..hidden], s.x[t * hidden ..][0..hidden], e.weights.output_norm, m.rms_norm_eps);
    }
    const logits = b.logits[0 .. n_samples * @as(usize, m.vocab_size)];
    matmul(e, logits, s.xs, n_samples, &.{e.weights.output});
    if (m.final_softcap != 0) for (logits) |*v| {
        v.* = m.final_softcap * std.math.tanh(v.* / m.final_softcap);
    };
    const masks = awaitMasks(e.batch);
    if (masks != .ok) return masks;
    parallel(pool, n_samples, SampleCtx{ .e = e }, SampleCtx.body);
    return .ok;
}
