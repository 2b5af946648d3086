#!/usr/bin/env python3
"""Writes the seed corpus of kvcache_fuzz (tests/fuzz/corpus/seed-*).

Each seed is a short, readable program in the input format that the top
comment of kvcache_fuzz.cpp defines, chosen to start the fuzzer on every
path at once: prefixes (miss, hit, partial-page copy, cached, evicted), forks
and copy-on-write, every append and write overload, Storage::none, bad ids,
layers and shapes, huge and zero sizes, invalid configurations. libFuzzer
mutates from there. Rerun after changing the format:

    python3 tests/fuzz/make_seeds.py
"""
import pathlib
import struct

OUT = pathlib.Path(__file__).resolve().parent / "corpus"

# byte 0
BASIC, PAGED, NONE, SMALL = 0x00, 0x01, 0x02, 0x04


def small_config(layers, heads, head_dim, dtype):
    """The one-byte small configuration."""
    code = {1: 0, 2: 1, 4: 2}[dtype]
    return bytes([(layers - 1) | ((heads - 1) << 2) | ((head_dim - 1) << 3) | (code << 6)])


def u32s(*values):
    return b"".join(struct.pack("<I", v) for v in values)


def u64(v):
    return struct.pack("<Q", v)


# Operands.
def ID(k):  # 0-15: "r<k>", 16: "", 17: a long id, 18: "r1\0x", 19: "R0"
    return bytes([k])


def TOK(n):  # small token counts (< 24); 200+ picks the 64-bit edges
    assert n < 24
    return bytes([n])


NEAR_MAX = bytes([200])  # 2^64 - 1
HALF = bytes([216])      # 2^63
TWO32 = bytes([228])     # 2^32


def LAYER(l):
    return bytes([l])


BAD_LAYER = bytes([240])   # num_layers
HUGE_LAYER = bytes([255])  # SIZE_MAX - 7


def ROW(seed, shape=0):  # shape 0: right length, 2: one off, 3: empty / double
    return bytes([(shape << 6) | (seed & 31)])


def HASH(k):  # 0-3: "h0".."h3", 4: "", 5: a long hash
    return bytes([k])


def POS(p):
    return bytes([p])


# Paged operations.
def alloc(i, prompt):
    return bytes([0]) + ID(i) + TOK(prompt)


def alloc_prefix(i, prompt, h, prefix):
    return bytes([1]) + ID(i) + TOK(prompt) + HASH(h) + TOK(prefix)


def append(i, l, k=1, v=2):
    return bytes([2]) + ID(i) + LAYER(l) + ROW(k) + ROW(v)


def append_f(i, l, k=1, v=2):
    return bytes([3]) + ID(i) + LAYER(l) + ROW(k) + ROW(v)


def append_zero(i, l):
    return bytes([4]) + ID(i) + LAYER(l)


def append_all(i):
    return bytes([5]) + ID(i)


def write(i, l, p, k=3, v=4):
    return bytes([6]) + ID(i) + LAYER(l) + POS(p) + ROW(k) + ROW(v)


def write_tokens(i, l, p, k=3, v=4):
    return bytes([15]) + ID(i) + LAYER(l) + POS(p) + ROW(k) + ROW(v)


def write_f(i, l, p, k=3, v=4):
    return bytes([7]) + ID(i) + LAYER(l) + POS(p) + ROW(k) + ROW(v)


def fork(p, c):
    return bytes([8]) + ID(p) + ID(c)


def free(i):
    return bytes([9]) + ID(i)


def evict(h):
    return bytes([10]) + HASH(h)


def clear():
    return bytes([11])


def queries(i, l):
    return bytes([12]) + ID(i) + LAYER(l)


def alloc_content(i, tokens, salt=0):  # token ids 0..2; salt 0: "", 1: "a"
    return bytes([14]) + ID(i) + bytes([len(tokens)] + list(tokens)) + bytes([salt])


def append_ids(i, tokens):
    return bytes([13]) + ID(i) + bytes([len(tokens)] + list(tokens))


def paged(config, page, pages, *ops, none=False):
    head = bytes([PAGED | SMALL | (NONE if none else 0)]) + config + bytes([page - 1, pages, 0])
    return head + b"".join(ops)


# Basic operations.
def b_alloc(i, prompt, max_gen):
    return bytes([0]) + ID(i) + prompt + max_gen


def b_append(i, l, k=1, v=2):
    return bytes([2]) + ID(i) + LAYER(l) + ROW(k) + ROW(v)


def b_append_f(i, l, k=1, v=2):
    return bytes([4]) + ID(i) + LAYER(l) + ROW(k) + ROW(v)


def b_append_zero(i, l):
    return bytes([7]) + ID(i) + LAYER(l)


def b_free(i):
    return bytes([5]) + ID(i)


def b_queries(i, l):
    return bytes([6]) + ID(i) + LAYER(l)


def basic(config, budget_tokens_x2, *ops, none=False):
    head = bytes([BASIC | SMALL | (NONE if none else 0)]) + config + bytes([budget_tokens_x2, 0])
    return head + b"".join(ops)


TWO_LAYERS = small_config(2, 1, 4, 2)  # 8-byte rows
FLOATS = small_config(2, 1, 2, 4)      # fp32: 2 floats, 8-byte rows
FOUR_LAYERS = small_config(4, 2, 8, 1)

SEEDS = {
    "seed-paged-lifecycle": paged(
        TWO_LAYERS, 4, 16,
        alloc(0, 5), append(0, 0), write(0, 1, 2), fork(0, 1), append(1, 0, 7, 8),
        write(1, 0, 0), write_tokens(0, 0, 4), append_all(0), append_zero(1, 1),
        queries(0, 1), queries(5, 0), free(0), append_all(1), free(1), alloc(16, 0),
        alloc(17, 3), alloc(18, 2), free(16)),
    "seed-paged-prefix": paged(
        TWO_LAYERS, 4, 16,
        alloc_prefix(0, 9, 0, 6), write(0, 0, 0), write(0, 1, 5), alloc_prefix(1, 11, 0, 6),
        alloc_prefix(2, 6, 0, 6), append(2, 0), write(1, 0, 1), free(0), free(1), free(2),
        alloc(3, 20), alloc_prefix(4, 9, 0, 6), alloc_prefix(5, 8, 1, 8), alloc_prefix(6, 10, 1, 8),
        evict(0), evict(2), free(4), clear(), alloc_prefix(7, 3, 5, 3)),
    # Automatic prefix caching by content: a prompt, the same prompt again
    # (a hit), another salt (a miss), decode steps that fill pages, a fork
    # appending the same tokens (an equal block), per-layer appends refused,
    # frees (blocks cached), a hit on cached blocks, pressure that evicts
    # them, clear.
    "seed-paged-content": paged(
        TWO_LAYERS, 2, 24,
        alloc_content(0, [0, 1, 2, 0, 1]), write(0, 0, 0), write(0, 1, 3), alloc_content(1, [0, 1, 2, 0, 2]),
        alloc_content(2, [0, 1, 2, 0, 1], 1), append_ids(0, [2, 2, 1]), fork(0, 3), append_ids(3, [0]),
        append_ids(0, [0]), append_zero(0, 0), append_all(1), append_ids(4, [1]), alloc(4, 3),
        append_ids(4, [1]), free(0), free(3), alloc_content(5, [0, 1, 2, 0, 1, 2, 2, 1, 0]),
        alloc(6, 20), alloc_content(7, [1] * 12), write(5, 1, 2), free(5), clear(), alloc_content(8, [])),
    "seed-paged-pressure": paged(
        TWO_LAYERS, 4, 6,
        alloc_prefix(0, 6, 0, 5), free(0), alloc(1, 4), append_zero(1, 0), append_zero(1, 0),
        append_zero(1, 0), append_zero(1, 0), append_zero(1, 1), alloc(2, 8), fork(1, 3),
        write(3, 0, 0), write(3, 0, 4), append_all(3), append_all(1), free(1), append_all(3)),
    "seed-paged-errors": paged(
        TWO_LAYERS, 4, 8,
        alloc(0, 4), alloc(0, 4), bytes([0]) + ID(1) + NEAR_MAX, bytes([0]) + ID(1) + HALF,
        bytes([0]) + ID(1) + TWO32, append(0, 0, 1, 2) + b"", bytes([2]) + ID(0) + BAD_LAYER + ROW(1) + ROW(1),
        bytes([2]) + ID(0) + HUGE_LAYER + ROW(1) + ROW(1), bytes([2]) + ID(0) + LAYER(0) + ROW(1, 2) + ROW(1),
        bytes([2]) + ID(0) + LAYER(0) + ROW(1) + ROW(1, 3), append(9, 0), append_f(0, 0),
        write(0, 0, 30), write(0, 0, 250), write_tokens(0, 1, 255), write(9, 0, 0), fork(9, 1),
        fork(0, 0), free(9), alloc_prefix(1, 4, 4, 2), alloc_prefix(1, 4, 0, 0), alloc_prefix(1, 4, 0, 5),
        alloc_prefix(1, 4, 0, 2), alloc_prefix(2, 4, 0, 3), alloc_prefix(0, 4, 1, 2), evict(3),
        queries(0, 240), queries(19, 0)),
    "seed-paged-floats": paged(
        FLOATS, 2, 12,
        alloc(0, 3), append_f(0, 0), append_f(0, 1, 5, 6), write_f(0, 0, 1), fork(0, 1),
        write_f(1, 1, 0), bytes([3]) + ID(0) + LAYER(0) + ROW(1, 2) + ROW(1),
        bytes([7]) + ID(0) + LAYER(0) + POS(0) + ROW(1) + ROW(1, 3), append(1, 0)),
    "seed-paged-none": paged(
        FOUR_LAYERS, 3, 20,
        alloc(0, 7), append_zero(0, 2), append_all(0), append(0, 0), write(0, 0, 0), queries(0, 0),
        alloc_prefix(1, 7, 2, 4), alloc_prefix(2, 9, 2, 4), fork(2, 3), append_zero(3, 3),
        append_all(2), free(1), free(2), free(3), alloc(4, 23),
        none=True),
    "seed-basic-lifecycle": basic(
        TWO_LAYERS, 20,
        b_alloc(0, TOK(2), TOK(1)), b_append(0, 0), b_append(0, 0, 3, 4), b_append(0, 0, 5, 6),
        b_append(0, 0, 7, 8), b_append(0, 1), b_alloc(0, TOK(1), TOK(1)), b_alloc(1, TOK(0), TOK(0)),
        b_append(1, 0), b_alloc(2, TOK(20), TOK(20)), b_alloc(2, NEAR_MAX, TOK(1)),
        b_alloc(2, HALF, HALF), b_alloc(2, TWO32, TOK(0)), b_queries(0, 1), b_queries(3, 0),
        bytes([2]) + ID(0) + BAD_LAYER + ROW(1) + ROW(1), bytes([2]) + ID(0) + LAYER(1) + ROW(1, 2) + ROW(1),
        b_append(7, 0), b_append_f(0, 1), b_free(0), b_free(0), b_alloc(17, TOK(3), TOK(3)),
        b_append(17, 1), b_free(1), b_free(17)),
    "seed-basic-none": basic(
        FOUR_LAYERS, 30,
        b_alloc(0, TOK(2), TOK(1)), b_append_zero(0, 3), b_append_zero(0, 3), b_append_zero(0, 3),
        b_append_zero(0, 3), b_append(0, 0), b_append_f(0, 1), b_queries(0, 0), b_alloc(1, TOK(20), TOK(20)),
        b_alloc(2, NEAR_MAX, TOK(2)), b_append_zero(5, 0), b_free(0), b_free(1),
        none=True),
    "seed-basic-floats": basic(
        FLOATS, 12,
        b_alloc(0, TOK(1), TOK(2)), b_append_f(0, 0), b_append_f(0, 0, 9, 10), b_append_f(0, 0),
        b_append_f(0, 0), bytes([4]) + ID(0) + LAYER(1) + ROW(1, 2) + ROW(1), b_append(0, 1),
        b_append_zero(0, 1), b_free(0)),
    # Invalid and extreme configurations: each input builds one cache.
    "seed-config-zero-field": bytes([PAGED]) + u32s(2, 0, 4, 2) + bytes([3, 8, 0]),
    "seed-config-overflow": bytes([BASIC]) + u32s(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
    "seed-config-page-zero": bytes([PAGED | SMALL]) + TWO_LAYERS + bytes([0, 8, 0]),
    "seed-config-page-huge": bytes([PAGED | SMALL]) + TWO_LAYERS + bytes([255]) + u64(1 << 62) + bytes([8, 0]),
    "seed-config-budget-huge": bytes([PAGED | SMALL]) + small_config(1, 1, 1, 1) + bytes([8, 255]) + u64(2**64 - 1),
    "seed-basic-budget-huge": bytes([BASIC | SMALL]) + TWO_LAYERS + bytes([255]) + u64(2**64 - 1)
    + b_alloc(0, bytes([247]), TOK(1)) + b_alloc(1, NEAR_MAX, TOK(0)) + b_alloc(2, TOK(3), TOK(3))
    + b_append(2, 1) + b_free(2),
}

# Regressions: inputs that broke a check before their bug was fixed (each
# bug also has a unit test in tests/unit/paged_test.cpp).
SEEDS |= {
    # Storage::none, page size 2^40, one layer of 1-byte rows: a request of
    # exactly one full page (2^40 tokens) and its fork. memory_efficiency()
    # takes the shared-page scan, which casts each page's used slots to
    # uint32: 2^40 became 0 and the result 0.0 instead of 1.0.
    "regression-efficiency-page-size-2p40-fork": bytes([PAGED | NONE]) + u32s(1, 1, 1, 1)
    + bytes([255]) + u64(1 << 40) + bytes([4, 0])
    + bytes([0]) + ID(0) + bytes([248]) + u64(1 << 40) + fork(0, 1),
    # 4 layers, page size 4: "h0" registered (6 tokens), then
    # admission(2^64 - 1 tokens, "h0", 6). Its page count (2^62 per layer,
    # 2^64 in all) overflows: allocate_paged, can_allocate and
    # pages_needed_to_allocate throw std::overflow_error; admission with a
    # registered prefix skipped that check and answered Admission::never.
    "regression-admission-prefix-hit-page-count-overflow": paged(
        small_config(4, 1, 4, 2), 4, 40,
        alloc_prefix(0, 9, 0, 6), bytes([1]) + ID(1) + NEAR_MAX + HASH(0) + TOK(6)),
}

# Inputs libFuzzer found, kept byte for byte (they are not readable programs).
# regression-content-huge-page-reserve: page size ~2^46 in Storage::none, then
# allocate_paged by token ids, which reserved a whole page of token ids.
SEEDS["regression-content-huge-page-reserve"] = bytes.fromhex(
    "5b04ffffff031000570000000606000000030406000105030401010b000601020900090109"
    "0200031401040900060105080108010608ffc1fecaffffffffffff000000006e67")

if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name, data in SEEDS.items():
        (OUT / name).write_bytes(data)
    print(f"{len(SEEDS)} seeds in {OUT}")
