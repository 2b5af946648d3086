/* proofs/spin/kvcache.pml: an exhaustive model of kvcache's page pool,
 * reference counts, prefix registry and PagedKVCache, AS THE C++ IMPLEMENTS
 * IT (modules/allocator, modules/prefix, modules/paged). proofs/README.md
 * explains how to read and extend it; every `inline` below names the C++
 * function it transcribes.
 *
 * One driver process calls the API forever; every call is one d_step (a whole
 * API call is atomic: the cache is single-threaded and an engine serialises
 * calls), and every argument combination within the bounds is an option of
 * the driver's `do`, so SPIN explores every sequence of whole calls. After
 * each call `check_all` asserts every invariant; a call that returns false
 * or throws must leave the whole state equal to the snapshot taken before it.
 *
 * Bounds (set with -D on the spin command line, see proofs/check):
 *   NP pages, NR request slots, NL layers, PS tokens per page, MAXTOK tokens
 *   per layer (appends stop there: a model bound, not a failure), MAXPROMPT,
 *   NH prefix hashes, PT0/PT1 the prefix length of hash 0/1.
 *
 * Abstractions (justified in proofs/README.md):
 *   - bytes: a slot holds a small "writer value" instead of a K/V row:
 *     an append with data by request r writes A(r), write_kv writes W(r),
 *     zero means zero bytes; the written mark of each page is exact;
 *   - request ids are slots 0..NR-1; serials: a prefix's registrant is the
 *     slot of the registering request, reset to NONE when that request is
 *     freed (a freed serial never matches again in the C++);
 *   - hash strings are 0..NH-1, each with one fixed prefix length (another
 *     length throws std::invalid_argument before any change);
 *   - generations of PagePool handles are not modelled (the cache always
 *     rebuilds the current handle with pool_.handle(page)); a release or
 *     retain of a free page is an assertion failure here;
 *   - host storage (the superset: Storage::none has no data path).
 */

#ifndef NP
#define NP 4
#endif
#ifndef NR
#define NR 3
#endif
#ifndef NL
#define NL 1
#endif
#ifndef PS
#define PS 2
#endif
#ifndef MAXTOK
#define MAXTOK 4
#endif
#ifndef MAXPROMPT
#define MAXPROMPT 4
#endif
#ifndef NH
#define NH 2
#endif
#ifndef PT0
#define PT0 1
#endif
#ifndef PT1
#define PT1 3
#endif
/* bytes per page for the byte accounting (any positive constant: the Why3
 * model proves the accounting for a symbolic one) */
#ifndef BPP
#define BPP 48
#endif

#define NONE 255
#define MAXPPL ((MAXTOK + PS - 1) / PS)        /* pages per layer at most */
#define PMAX (NL * MAXPPL)                     /* prefix pages at most */
#define CEIL(tv) (((tv) + PS - 1) / PS)
#define PT(hv) ((hv) == 0 -> PT0 : PT1)
#define IDX(r, lv) ((r) * NL + (lv))
#define TB(r, lv, kv) (IDX(r, lv) * MAXPPL + (kv))
#define EX(r, lv, tv) (IDX(r, lv) * MAXTOK + (tv))
#define PG(hv, j) ((hv) * PMAX + (j))
#ifdef WRITER_IDS
#define A(r) ((r) + 1)                         /* value an append with data writes */
#define W(r) ((r) + 1 + NR)                    /* value write_kv writes */
#else
#define A(r) 1                                 /* one bit: written by a request */
#define W(r) 1
#endif
/* what a reader of page p, slot s sees (get_kv): the bytes below the written
 * mark, zero past it */
#define READ(pv, s) ((s) < written[pv] -> data[(pv) * PS + (s)] : 0)

/* ---- state: the C++ objects ------------------------------------------------ */
/* PagePool: Slot::refs, the LRU free list (head at 0), free_count_ */
byte refs[NP];
byte flist[NP];
byte nfree;
/* PrefixRegistry: owner_, the Prefix entries, the LRU list, cached_,
 * request_refs_ */
byte owner[NP];
bool preg[NH];          /* registered (an entry in prefixes_) */
byte ppages[NH * PMAX]; /* Prefix::pages, layer-major: pages[l * ppl + k] */
byte pnpages[NH];
byte preg_r[NH];        /* Prefix::registrant (slot), NONE once that request is gone */
byte pcached[NH];       /* Prefix::cached */
bool ponlru[NH];        /* Prefix::on_lru */
byte lru[NH];           /* LRU list, least recently touched first */
byte nlru;
byte cached;            /* cached_ */
byte reqrefs;           /* request_refs_ */
/* PagedKVCache: requests_ (block tables, tokens), stored_, written_, arena */
bool alive[NR];
byte tok[NR * NL];
byte tlen[NR * NL];
byte tbl[NR * NL * MAXPPL];
byte stored;
byte written[NP];
byte data[NP * PS];
/* ghost: what each request has written or been given, token by token */
byte expv[NR * NL * MAXTOK];

/* ---- temporaries and the snapshot: not part of the state vector ----------- */
hidden byte pi, rfreed, rh, li, eh, ek, epg, ef, efreed, mi, mh, mpg, mnew, mdone;
hidden byte csl, cn, ci, wi, tpg, rold, ai, apg, as, nneed, nper, ppl, rem, cp, nshr, nfresh;
hidden byte lv, kv, tv, hv, pv, xv, yv, ncnt, okv, wr, nb;
hidden byte hc[NP];
hidden byte best[NP];
hidden byte s_refs[NP], s_flist[NP], s_nfree, s_owner[NP], s_ppages[NH * PMAX];
hidden byte s_pnpages[NH], s_preg_r[NH], s_pcached[NH], s_lru[NH], s_nlru, s_cached;
hidden byte s_reqrefs, s_tok[NR * NL], s_tlen[NR * NL], s_tbl[NR * NL * MAXPPL], s_stored;
hidden byte s_written[NP], s_data[NP * PS], s_expv[NR * NL * MAXTOK];
hidden byte s_preg[NH], s_ponlru[NH], s_alive[NR];

/* ---- PagePool (modules/allocator/allocator.cpp) --------------------------- */

/* PagePool::pop_front via allocate(): the head of the free list, one ref */
inline pool_pop_front(pg) {
  assert(nfree > 0);
  pg = flist[0];
  pi = 0;
  do
  :: pi + 1 < nfree -> flist[pi] = flist[pi + 1]; pi++
  :: else -> break
  od;
  nfree--;
  flist[nfree] = NONE;
  assert(refs[pg] == 0);
  refs[pg] = 1
}

/* PagePool::retain: the page must be live (StalePage otherwise) */
inline pool_retain(pg) {
  assert(refs[pg] > 0);
  refs[pg]++
}

/* PagePool::release: the last reference sends the page to the tail */
inline pool_release(pg, fr) {
  assert(refs[pg] > 0);
  refs[pg]--;
  if
  :: refs[pg] == 0 -> flist[nfree] = pg; nfree++; fr = 1
  :: else -> fr = 0
  fi
}

/* ---- PrefixRegistry (modules/prefix/prefix.cpp) --------------------------- */

inline lru_unlink(lh) {
  assert(ponlru[lh]);
  li = 0;
  do
  :: lru[li] != lh -> li++
  :: else -> break
  od;
  do
  :: li + 1 < nlru -> lru[li] = lru[li + 1]; li++
  :: else -> break
  od;
  nlru--;
  lru[nlru] = NONE;
  ponlru[lh] = 0
}

inline lru_push_back(lh) {
  assert(!ponlru[lh]);
  lru[nlru] = lh;
  nlru++;
  ponlru[lh] = 1
}

inline page_became_cached(ch) {
  cached++;
  pcached[ch]++;
  if
  :: ponlru[ch] -> lru_unlink(ch)
  :: else
  fi;
  lru_push_back(ch)
}

inline page_left_cache(ch) {
  assert(cached > 0 && pcached[ch] > 0);
  cached--;
  pcached[ch]--;
  if
  :: pcached[ch] == 0 -> lru_unlink(ch)
  :: else
  fi
}

/* request holders of a live page (PrefixRegistry::request_holders) */
#define RH(pg) (refs[pg] - (owner[pg] != NONE -> 1 : 0))
/* PrefixRegistry::writable_by: the copy-on-write rule of the C++ */
#define WRITABLE(pg, r) (RH(pg) == 1 && (owner[pg] == NONE || preg_r[owner[pg]] == (r)))

inline reg_take(pg) {
  pool_pop_front(pg);
  assert(owner[pg] == NONE)
}

inline reg_retain(pg) {
  if
  :: owner[pg] != NONE && refs[pg] == 1 -> rh = owner[pg]; page_left_cache(rh)
  :: else
  fi;
  pool_retain(pg)
}

inline reg_release(pg) {
  pool_release(pg, rfreed);
  if
  :: owner[pg] != NONE && refs[pg] == 1 -> rh = owner[pg]; page_became_cached(rh)
  :: else
  fi
}

/* PrefixRegistry::hold: the registry's reference to a registrant's page */
inline hold(hh, pg) {
  assert(owner[pg] == NONE);
  pool_retain(pg);
  owner[pg] = hh;
  ppages[PG(hh, pnpages[hh])] = pg;
  pnpages[hh]++;
  assert(refs[pg] >= 2)
}

inline touch(hh) {
  if
  :: ponlru[hh] -> lru_unlink(hh); lru_push_back(hh)
  :: else
  fi
}

/* PrefixRegistry::evict: drops every registry reference, last page first */
inline evict(vh) {
  if
  :: ponlru[vh] -> lru_unlink(vh)
  :: else
  fi;
  efreed = 0;
  ek = pnpages[vh];
  do
  :: ek > 0 ->
     ek--;
     epg = ppages[PG(vh, ek)];
     owner[epg] = NONE;
     pool_release(epg, ef);
     efreed = efreed + ef;
     ppages[PG(vh, ek)] = NONE
  :: else -> break
  od;
  assert(efreed == pcached[vh]);
  cached = cached - pcached[vh];
  preg[vh] = 0;
  pnpages[vh] = 0;
  pcached[vh] = 0;
  preg_r[vh] = NONE
}

inline evict_lru() {
  assert(nlru > 0);
  eh = lru[0];
  evict(eh)
}

#define EVICTABLE_EXCEPT(kp) (cached - ((kp) == NONE -> 0 : pcached[kp]))

/* PrefixRegistry::make_room: evict LRU prefixes, never `keep`, until n free */
inline make_room(mn, mkeep) {
  assert(nfree + EVICTABLE_EXCEPT(mkeep) >= mn);
  mi = 0;
  do
  :: nfree < mn ->
     assert(mi < nlru);
     if
     :: lru[mi] != mkeep -> mh = lru[mi]; evict(mh)
     :: else -> mi++
     fi
  :: else -> break
  od
}

/* ---- PageList (modules/prefix/prefix.cpp) --------------------------------- */

inline adopt(r, al, pg) {
  tbl[TB(r, al, tlen[IDX(r, al)])] = pg;
  tlen[IDX(r, al)]++;
  reqrefs++
}

inline share(r, al, pg) {
  tpg = pg;
  reg_retain(tpg);
  adopt(r, al, tpg)
}

inline replace(r, al, ri, pg) {
  rold = tbl[TB(r, al, ri)];
  tbl[TB(r, al, ri)] = pg;
  reg_release(rold)
}

/* ---- PagedKVCache (modules/paged/paged.cpp) ------------------------------- */

inline take_page(pg) {
  reg_take(pg);
  written[pg] = 0
}

/* copy_page: the copy shows min(slots, written) slots, zero past them */
inline copy_page(cfrom, cslots, cto) {
  take_page(cto);
  cn = (cslots < written[cfrom] -> cslots : written[cfrom]);
  ci = 0;
  do
  :: ci < cn -> data[cto * PS + ci] = data[cfrom * PS + ci]; ci++
  :: else -> break
  od;
  written[cto] = cn
}

/* The property every in-place write must satisfy (INV-PAGED-7), computed
 * from the block tables, independently of the code's writable_by: no other
 * request holds the page, and if the registry does, the writer registered it. */
inline assert_exclusive(pg, r) {
  xv = 0;
  do
  :: xv < NR ->
     if
     :: xv != (r) && alive[xv] ->
        yv = 0;
        do
        :: yv < NL * MAXPPL ->
           assert(!(yv % MAXPPL < tlen[xv * NL + yv / MAXPPL] && tbl[xv * NL * MAXPPL + yv] == pg));
           yv++
        :: else -> break
        od
     :: else
     fi;
     xv++
  :: else -> break
  od;
  assert(owner[pg] == NONE || preg_r[owner[pg]] == (r))
}

inline write_slot(wpg, ws, wv, r) {
  assert_exclusive(wpg, r);
  wi = written[wpg];
  do
  :: wi < ws -> data[wpg * PS + wi] = 0; wi++
  :: else -> break
  od;
  data[wpg * PS + ws] = wv;
  if
  :: written[wpg] < ws + 1 -> written[wpg] = ws + 1
  :: else
  fi
}

inline zero_slot(zpg, zs, r) {
  assert_exclusive(zpg, r);
  data[zpg * PS + zs] = 0
}

#define SLOTS_USED(r, ul, ui) (tok[IDX(r, ul)] - (ui) * PS < PS -> tok[IDX(r, ul)] - (ui) * PS : PS)
#define LAST_FULL(r, ul) (tok[IDX(r, ul)] % PS == 0)
#define NEEDS_PAGE(r, ul) (LAST_FULL(r, ul) || !WRITABLE(tbl[TB(r, ul, tlen[IDX(r, ul)] - 1)], r))

/* make_writable: copy-on-write of entry xi of the layer's table */
inline make_writable(r, ml, xi, mok) {
  if
  :: WRITABLE(tbl[TB(r, ml, xi)], r) -> mok = 1
  :: else ->
     if
     :: nfree == 0 && cached == 0 -> mok = 0
     :: else ->
        mdone = 0;
        do
        :: nfree == 0 ->
           evict_lru();
           if
           :: WRITABLE(tbl[TB(r, ml, xi)], r) -> mdone = 1; break
           :: else
           fi
        :: else -> break
        od;
        if
        :: !mdone ->
           mpg = tbl[TB(r, ml, xi)];
           csl = SLOTS_USED(r, ml, xi);
           copy_page(mpg, csl, mnew);
           replace(r, ml, xi, mnew)
        :: else
        fi;
        mok = 1
     fi
  fi
}

/* append_one: a data append writes val; hasdata == 0 appends a zero token */
inline append_one(r, al, val, hasdata, aok) {
  ai = IDX(r, al);
  if
  :: LAST_FULL(r, al) ->
     if
     :: nfree == 0 && cached == 0 -> aok = 0
     :: else ->
        if
        :: nfree == 0 -> evict_lru()
        :: else
        fi;
        take_page(apg);
        adopt(r, al, apg);
        aok = 1
     fi
  :: else -> make_writable(r, al, tlen[ai] - 1, aok)
  fi;
  if
  :: aok ->
     apg = tbl[TB(r, al, tlen[ai] - 1)];
     as = tok[ai] % PS;
     if
     :: hasdata -> write_slot(apg, as, val, r)
     :: else ->
        if
        :: as < written[apg] -> zero_slot(apg, as, r)
        :: else
        fi
     fi;
     expv[EX(r, al, tok[ai])] = (hasdata -> val : 0);
     tok[ai]++;
     stored++
  :: else
  fi
}

/* ---- the API calls ----------------------------------------------------------- */

inline op_alloc(r, n) {
  if
  :: alive[r] -> okv = 0                         /* duplicate id */
  :: else ->
     nneed = NL * CEIL(n);
     if
     :: nneed > nfree + EVICTABLE_EXCEPT(NONE) -> okv = 0   /* INV-PAGED-6, INV-REF-4 */
     :: else ->
        alive[r] = 1;
        make_room(nneed, NONE);
        for (lv : 0 .. NL - 1) {
          kv = 0;
          do
          :: kv < CEIL(n) -> take_page(apg); adopt(r, lv, apg); kv++
          :: else -> break
          od;
          tok[IDX(r, lv)] = n
        }
        stored = stored + NL * n;
        okv = 1
     fi
  fi
}

inline op_alloc_pfx(r, n, hh) {
  if
  :: alive[r] -> okv = 0
  :: else ->
     nper = CEIL(n);
     ppl = CEIL(PT(hh));
     rem = PT(hh) % PS;
     if
     :: !preg[hh] ->                             /* miss: register */
        nneed = NL * nper;
        if
        :: nneed > nfree + EVICTABLE_EXCEPT(NONE) -> okv = 0
        :: else ->
           preg[hh] = 1;                          /* prepare */
           preg_r[hh] = r;
           alive[r] = 1;
           make_room(nneed, hh);                  /* the new entry has no page yet */
           for (lv : 0 .. NL - 1) {
             kv = 0;
             do
             :: kv < nper -> take_page(apg); adopt(r, lv, apg); kv++
             :: else -> break
             od;
             kv = 0;
             do
             :: kv < ppl -> hold(hh, tbl[TB(r, lv, kv)]); kv++
             :: else -> break
             od;
             tok[IDX(r, lv)] = n
           }
           touch(hh);
           stored = stored + NL * n;
           okv = 1
        fi
     :: else ->                                  /* hit: share, copy a partial page */
        cp = (rem != 0 && n > PT(hh) -> 1 : 0);
        nshr = ppl - cp;
        nfresh = nper - ppl;
        nneed = NL * (nfresh + cp);
        if
        :: nneed > nfree + EVICTABLE_EXCEPT(hh) -> okv = 0   /* INV-REF-4, INV-REF-5 */
        :: else ->
           alive[r] = 1;
           make_room(nneed, hh);                  /* never the reused prefix */
           assert(preg[hh]);                      /* INV-REF-5: the reused prefix survived */
           for (lv : 0 .. NL - 1) {
             kv = 0;
             do
             :: kv < nshr -> share(r, lv, ppages[PG(hh, lv * ppl + kv)]); kv++
             :: else -> break
             od;
             if
             :: cp -> mpg = ppages[PG(hh, lv * ppl + ppl - 1)]; csl = rem; copy_page(mpg, csl, apg); adopt(r, lv, apg)
             :: else
             fi;
             kv = 0;
             do
             :: kv < nfresh -> take_page(apg); adopt(r, lv, apg); kv++
             :: else -> break
             od;
             tok[IDX(r, lv)] = n;
             /* the request sees the prefix's bytes, then zeros */
             tv = 0;
             do
             :: tv < n ->
                if
                :: tv < PT(hh) -> mpg = ppages[PG(hh, lv * ppl + tv / PS)]; expv[EX(r, lv, tv)] = READ(mpg, tv % PS)
                :: else -> expv[EX(r, lv, tv)] = 0
                fi;
                tv++
             :: else -> break
             od
           }
           touch(hh);
           stored = stored + NL * n;
           okv = 1
        fi
     fi
  fi
}

inline op_fork(pa, ch) {
  if
  :: !alive[pa] -> okv = 0                       /* UnknownRequest: throws */
  :: alive[ch] -> okv = 0                        /* existing child id */
  :: else ->
     alive[ch] = 1;
     for (lv : 0 .. NL - 1) {
       kv = 0;
       do
       :: kv < tlen[IDX(pa, lv)] -> share(ch, lv, tbl[TB(pa, lv, kv)]); kv++
       :: else -> break
       od;
       tok[IDX(ch, lv)] = tok[IDX(pa, lv)];
       stored = stored + tok[IDX(pa, lv)];
       tv = 0;
       do
       :: tv < MAXTOK -> expv[EX(ch, lv, tv)] = expv[EX(pa, lv, tv)]; tv++
       :: else -> break
       od
     }
     okv = 1
  fi
}

/* append_token_paged with data (hasdata 1) or without (a zero token) */
inline op_append(r, al, hasdata) {
  if
  :: !alive[r] || tok[IDX(r, al)] >= MAXTOK -> okv = 2   /* unknown id / model bound: skipped */
  :: else -> append_one(r, al, A(r), hasdata, okv)
  fi
}

inline op_append_all(r) {
  okv = 1;
  if
  :: !alive[r] -> okv = 2
  :: else ->
     for (lv : 0 .. NL - 1) {
       if
       :: tok[IDX(r, lv)] >= MAXTOK -> okv = 2
       :: else
       fi
     }
  fi;
  if
  :: okv == 1 ->
     nb = 0;
     for (lv : 0 .. NL - 1) {
       if
       :: NEEDS_PAGE(r, lv) -> nb++
       :: else
       fi
     }
     if
     :: nb > nfree + EVICTABLE_EXCEPT(NONE) -> okv = 0
     :: else ->
        for (lv : 0 .. NL - 1) {
          append_one(r, lv, 0, 0, okv);
          assert(okv)
        }
     fi
  :: else
  fi
}

inline op_write(r, al, pos) {
  if
  :: !alive[r] || pos >= tok[IDX(r, al)] -> okv = 2   /* throws before anything */
  :: else ->
     make_writable(r, al, pos / PS, okv);              /* !ok: OutOfPages, no change */
     if
     :: okv ->
        mpg = tbl[TB(r, al, pos / PS)];
        write_slot(mpg, pos % PS, W(r), r);
        expv[EX(r, al, pos)] = W(r)
     :: else
     fi
  fi
}

inline op_free(r) {
  if
  :: !alive[r] -> okv = 2
  :: else ->
     for (lv : 0 .. NL - 1) {
       stored = stored - tok[IDX(r, lv)]
     }
     /* ~Request: the tables in order, each last page first */
     for (lv : 0 .. NL - 1) {
       do
       :: tlen[IDX(r, lv)] > 0 ->
          tlen[IDX(r, lv)]--;
          tpg = tbl[TB(r, lv, tlen[IDX(r, lv)])];
          reg_release(tpg);
          reqrefs--;
          tbl[TB(r, lv, tlen[IDX(r, lv)])] = NONE
       :: else -> break
       od;
       tok[IDX(r, lv)] = 0;
       tv = 0;
       do
       :: tv < MAXTOK -> expv[EX(r, lv, tv)] = 0; tv++
       :: else -> break
       od
     }
     alive[r] = 0;
     /* serials are never reused: the registrant is gone for good */
     for (hv : 0 .. NH - 1) {
       if
       :: preg_r[hv] == r -> preg_r[hv] = NONE
       :: else
       fi
     }
     okv = 1
  fi
}

inline op_evict_prefix(hh) {
  if
  :: !preg[hh] -> okv = 0
  :: else -> evict(hh); okv = 1
  fi
}

inline op_clear_prefixes() {
  for (hv : 0 .. NH - 1) {
    if
    :: preg[hv] -> evict(hv)
    :: else
    fi
  }
  okv = 1
}

/* ---- snapshot and invariants ---------------------------------------------- */

inline snap() {
  for (xv : 0 .. NP - 1) {
    s_refs[xv] = refs[xv]; s_flist[xv] = flist[xv]; s_owner[xv] = owner[xv];
    s_written[xv] = written[xv]
  }
  for (xv : 0 .. NP * PS - 1) { s_data[xv] = data[xv] }
  for (xv : 0 .. NH - 1) {
    s_pnpages[xv] = pnpages[xv]; s_preg_r[xv] = preg_r[xv]; s_pcached[xv] = pcached[xv];
    s_lru[xv] = lru[xv]; s_preg[xv] = preg[xv]; s_ponlru[xv] = ponlru[xv]
  }
  for (xv : 0 .. NH * PMAX - 1) { s_ppages[xv] = ppages[xv] }
  for (xv : 0 .. NR - 1) { s_alive[xv] = alive[xv] }
  for (xv : 0 .. NR * NL - 1) { s_tok[xv] = tok[xv]; s_tlen[xv] = tlen[xv] }
  for (xv : 0 .. NR * NL * MAXPPL - 1) { s_tbl[xv] = tbl[xv] }
  for (xv : 0 .. NR * NL * MAXTOK - 1) { s_expv[xv] = expv[xv] }
  s_nfree = nfree; s_nlru = nlru; s_cached = cached; s_reqrefs = reqrefs; s_stored = stored
}

/* INV-PAGED-6 / INV-POOL-4 / INV-REF-4: a failed call changed nothing */
inline assert_unchanged() {
  for (xv : 0 .. NP - 1) {
    assert(s_refs[xv] == refs[xv] && s_flist[xv] == flist[xv] && s_owner[xv] == owner[xv] &&
           s_written[xv] == written[xv])
  }
  for (xv : 0 .. NP * PS - 1) { assert(s_data[xv] == data[xv]) }
  for (xv : 0 .. NH - 1) {
    assert(s_pnpages[xv] == pnpages[xv] && s_preg_r[xv] == preg_r[xv] && s_pcached[xv] == pcached[xv] &&
           s_lru[xv] == lru[xv] && s_preg[xv] == preg[xv] && s_ponlru[xv] == ponlru[xv])
  }
  for (xv : 0 .. NH * PMAX - 1) { assert(s_ppages[xv] == ppages[xv]) }
  for (xv : 0 .. NR - 1) { assert(s_alive[xv] == alive[xv]) }
  for (xv : 0 .. NR * NL - 1) { assert(s_tok[xv] == tok[xv] && s_tlen[xv] == tlen[xv]) }
  for (xv : 0 .. NR * NL * MAXPPL - 1) { assert(s_tbl[xv] == tbl[xv]) }
  for (xv : 0 .. NR * NL * MAXTOK - 1) { assert(s_expv[xv] == expv[xv]) }
  assert(s_nfree == nfree && s_nlru == nlru && s_cached == cached && s_reqrefs == reqrefs &&
         s_stored == stored)
}

inline check_all() {
  /* request holders per page, counted from the block tables */
  for (pv : 0 .. NP - 1) { hc[pv] = 0; best[pv] = 0 }
  ncnt = 0;   /* block-table entries */
  yv = 0;     /* tokens */
  for (xv : 0 .. NR - 1) {
    for (lv : 0 .. NL - 1) {
      if
      :: alive[xv] ->
         assert(tok[IDX(xv, lv)] <= MAXTOK);
         assert(tlen[IDX(xv, lv)] == CEIL(tok[IDX(xv, lv)]));              /* INV-PAGED-2 */
         kv = 0;
         do
         :: kv < tlen[IDX(xv, lv)] ->
            pv = tbl[TB(xv, lv, kv)];
            assert(pv < NP);
            hc[pv]++;
            if
            :: best[pv] < SLOTS_USED(xv, lv, kv) -> best[pv] = SLOTS_USED(xv, lv, kv)
            :: else
            fi;
            kv++
         :: else -> break
         od;
         ncnt = ncnt + tlen[IDX(xv, lv)];
         yv = yv + tok[IDX(xv, lv)];
         /* no request sees bytes it did not write or was not given */
         for (tv : 0 .. MAXTOK - 1) {
           if
           :: tv < tok[IDX(xv, lv)] ->
              pv = tbl[TB(xv, lv, tv / PS)];
              assert(READ(pv, tv % PS) == expv[EX(xv, lv, tv)])
           :: else
           fi
         }
      :: else -> assert(tlen[IDX(xv, lv)] == 0 && tok[IDX(xv, lv)] == 0)
      fi
    }
  }
  assert(ncnt == reqrefs);                                              /* request_refs_ */
  assert(yv == stored);                                                 /* INV-PAGED-5 */
  /* free list: nfree distinct pages, each free (INV-POOL-2) */
  for (xv : 0 .. NP - 1) {
    if
    :: xv < nfree ->
       assert(flist[xv] < NP && refs[flist[xv]] == 0);
       assert(hc[flist[xv]] == 0 && owner[flist[xv]] == NONE);         /* not both free and held */
       for (yv : 0 .. NP - 1) { assert(yv == xv || yv >= nfree || flist[yv] != flist[xv]) }
    :: else -> assert(flist[xv] == NONE)
    fi
  }
  xv = 0; tv = 0; kv = 0; ncnt = 0;
  for (pv : 0 .. NP - 1) {
    assert(written[pv] <= PS);                                          /* INV-PAGED-4 */
    /* INV-REF-1 / INV-PAGED-3: refs == request holders + registry */
    assert(refs[pv] == hc[pv] + (owner[pv] != NONE -> 1 : 0));
    if
    :: refs[pv] == 0 -> xv++                                             /* free */
    :: hc[pv] > 0 -> tv++; ncnt = ncnt + best[pv]; assert(best[pv] >= 1 && best[pv] <= PS)   /* used */
    :: else -> kv++; assert(owner[pv] != NONE)                           /* cached */
    fi
  }
  assert(xv == nfree);                                                  /* INV-POOL-1 */
  assert(kv == cached);                                                 /* INV-REF-2 */
  assert(NP - nfree - cached == tv);                                    /* used_pages() */
  assert(nfree + (NP - nfree - cached) + cached == NP);                /* INV-PAGED-1 */
  /* bytes: used_memory = used_pages * bytes_per_page, and the three classes
   * of pages account for the pool's bytes exactly */
  assert((NP - nfree - cached) * BPP == tv * BPP);
  assert(nfree * BPP + (NP - nfree - cached) * BPP + cached * BPP == NP * BPP);
  /* memory_efficiency: tokens in request pages, each page once, fit them;
   * its O(1) path (no page listed twice) counts exactly those tokens */
  assert(ncnt <= tv * PS);
  assert(reqrefs != tv || stored == ncnt);
  /* registry: INV-REF-2 per prefix, INV-REF-3 */
  yv = 0;
  for (hv : 0 .. NH - 1) {
    if
    :: preg[hv] ->
       assert(pnpages[hv] == NL * CEIL(PT(hv)));
       assert(preg_r[hv] == NONE || alive[preg_r[hv]]);
       xv = 0;
       for (kv : 0 .. PMAX - 1) {
         if
         :: kv < pnpages[hv] ->
            pv = ppages[PG(hv, kv)];
            assert(pv < NP && owner[pv] == hv);
            if
            :: hc[pv] == 0 -> xv++
            :: else
            fi
         :: else -> assert(ppages[PG(hv, kv)] == NONE)
         fi
       }
       assert(xv == pcached[hv]);
       assert(ponlru[hv] == (pcached[hv] > 0));
       yv = yv + pcached[hv]
    :: else ->
       assert(pnpages[hv] == 0 && pcached[hv] == 0 && !ponlru[hv] && preg_r[hv] == NONE)
    fi
  }
  assert(yv == cached);
  /* owner_[p] == h iff p is in h's pages */
  for (pv : 0 .. NP - 1) {
    if
    :: owner[pv] != NONE ->
       assert(owner[pv] < NH && preg[owner[pv]]);
       xv = 0;
       for (kv : 0 .. PMAX - 1) {
         if
         :: kv < pnpages[owner[pv]] && ppages[PG(owner[pv], kv)] == pv -> xv++
         :: else
         fi
       }
       assert(xv == 1)
    :: else
    fi
  }
  /* the LRU list holds exactly the prefixes flagged on it, once each */
  xv = 0;
  for (hv : 0 .. NH - 1) {
    if
    :: ponlru[hv] -> xv++
    :: else
    fi
  }
  assert(xv == nlru);
  for (kv : 0 .. NH - 1) {
    if
    :: kv < nlru ->
       assert(lru[kv] < NH && ponlru[lru[kv]]);
       for (tv : 0 .. NH - 1) { assert(tv == kv || tv >= nlru || lru[tv] != lru[kv]) }
    :: else -> assert(lru[kv] == NONE)
    fi
  }
}


/* ---- canonical form: a symmetry reduction --------------------------------- */
/* The C++ never orders page ids: it compares them for equality and uses them
 * as indices, and the LRU order of the free list is kept in flist itself. So
 * renaming pages is a bisimulation, and after each call the pages are renamed
 * in order of first appearance (block tables, then prefix pages, then the free
 * list): states that differ only by page names are stored once. Bytes past a
 * page's written mark are never read (get_kv reads zero there, copy_page and
 * write_slot stop at or zero up to the mark), so they are set to zero. */
hidden byte newid[NP], c_refs[NP], c_owner[NP], c_written[NP], c_data[NP * PS], nxt;

inline name_page(pg) {
  if
  :: newid[pg] == NONE -> newid[pg] = nxt; nxt++
  :: else
  fi
}


/* Request slots are symmetric too (the driver calls every operation on every
 * slot and every pair): before the pages are named, the slots are sorted by a
 * key of what they hold (alive, tokens, the reference counts of their pages,
 * the bytes they expect, whether they registered a prefix). Equal keys are
 * left in place: any deterministic choice of representative is sound. */
hidden int rkey[NR], kk;
hidden byte sw;

inline req_key(rq) {
  kk = alive[rq];
  for (lv : 0 .. NL - 1) {
    kk = (kk * 7 + tok[IDX(rq, lv)]) % 1000003;
    for (kv : 0 .. MAXPPL - 1) {
      if
      :: kv < tlen[IDX(rq, lv)] -> kk = (kk * 7 + refs[tbl[TB(rq, lv, kv)]]) % 1000003
      :: else
      fi
    }
    for (tv : 0 .. MAXTOK - 1) { kk = (kk * 7 + expv[EX(rq, lv, tv)]) % 1000003 }
  }
  for (hv : 0 .. NH - 1) { kk = (kk * 3 + (preg_r[hv] == rq -> 1 : 0)) % 1000003 }
  rkey[rq] = kk
}

inline swap_req(a, b) {
  sw = alive[a]; alive[a] = alive[b]; alive[b] = sw;
  for (lv : 0 .. NL - 1) {
    sw = tok[IDX(a, lv)]; tok[IDX(a, lv)] = tok[IDX(b, lv)]; tok[IDX(b, lv)] = sw;
    sw = tlen[IDX(a, lv)]; tlen[IDX(a, lv)] = tlen[IDX(b, lv)]; tlen[IDX(b, lv)] = sw;
    for (kv : 0 .. MAXPPL - 1) {
      sw = tbl[TB(a, lv, kv)]; tbl[TB(a, lv, kv)] = tbl[TB(b, lv, kv)]; tbl[TB(b, lv, kv)] = sw
    }
    for (tv : 0 .. MAXTOK - 1) {
      sw = expv[EX(a, lv, tv)]; expv[EX(a, lv, tv)] = expv[EX(b, lv, tv)]; expv[EX(b, lv, tv)] = sw
    }
  }
  for (hv : 0 .. NH - 1) {
    if
    :: preg_r[hv] == a -> preg_r[hv] = b
    :: preg_r[hv] == b -> preg_r[hv] = a
    :: else
    fi
  }
  kk = rkey[a]; rkey[a] = rkey[b]; rkey[b] = kk
}

inline sort_requests() {
  for (xv : 0 .. NR - 1) { req_key(xv) }
  for (yv : 1 .. NR - 1) {
    for (xv : 0 .. NR - 2) {
      if
      :: xv + yv < NR + 1 && rkey[xv] > rkey[xv + 1] -> swap_req(xv, xv + 1)
      :: else
      fi
    }
  }
}

inline canon() {
  sort_requests();
  for (pv : 0 .. NP - 1) { newid[pv] = NONE }
  nxt = 0;
  for (xv : 0 .. NR * NL - 1) {
    for (kv : 0 .. MAXPPL - 1) {
      if
      :: kv < tlen[xv] -> name_page(tbl[xv * MAXPPL + kv])
      :: else
      fi
    }
  }
  for (xv : 0 .. NH * PMAX - 1) {
    if
    :: ppages[xv] != NONE -> name_page(ppages[xv])
    :: else
    fi
  }
  for (xv : 0 .. NP - 1) {
    if
    :: xv < nfree -> name_page(flist[xv])
    :: else
    fi
  }
  assert(nxt == NP);
  for (pv : 0 .. NP - 1) {
    c_refs[newid[pv]] = refs[pv];
    c_owner[newid[pv]] = owner[pv];
    c_written[newid[pv]] = written[pv];
    for (kv : 0 .. PS - 1) {
      c_data[newid[pv] * PS + kv] = (kv < written[pv] -> data[pv * PS + kv] : 0)
    }
  }
  for (pv : 0 .. NP - 1) {
    refs[pv] = c_refs[pv];
    owner[pv] = c_owner[pv];
    written[pv] = c_written[pv];
    if
    :: pv < nfree -> flist[pv] = newid[flist[pv]]
    :: else
    fi
  }
  for (xv : 0 .. NP * PS - 1) { data[xv] = c_data[xv] }
  for (xv : 0 .. NR * NL * MAXPPL - 1) {
    if
    :: tbl[xv] != NONE -> tbl[xv] = newid[tbl[xv]]
    :: else
    fi
  }
  for (xv : 0 .. NH * PMAX - 1) {
    if
    :: ppages[xv] != NONE -> ppages[xv] = newid[ppages[xv]]
    :: else
    fi
  }
}

/* ---- the callers ------------------------------------------------------------ */
/* One process per API call and argument combination (proofs/spin/gen-driver
 * lists them): each loops forever over one whole, atomic call, so SPIN
 * interleaves every sequence of whole calls. The arguments are constants of
 * the process (they cost no states) and the call's body is generated once.
 * The guards leave out only calls that throw before looking at anything
 * (unknown id, a position past the stored tokens) and appends past MAXTOK. */
#define BELOW_MAX(a) (tok[IDX(a, 0)] < MAXTOK && tok[IDX(a, NL - 1)] < MAXTOK)

/* CALLER(Name, guard, call): a process that makes `call` forever, one whole
 * call per step; qd == 1 marks the duplicate-id variant of an allocation. */
#define CALLER(name, guard, call) \
proctype name(byte qa; byte qb; byte qc; byte qd) { \
  do \
  :: d_step { \
       guard; \
       snap(); \
       call; \
       check_all(); \
       if \
       :: okv == 0 -> assert_unchanged() \
       :: else \
       fi; \
       canon(); \
       skip \
     } \
  od \
}

/* allocate_paged(qa, qb tokens): a new id (qd 0) or a live one (qd 1: false) */
CALLER(Alloc, alive[qa] == qd, op_alloc(qa, qb))
/* allocate_paged(qa, qb tokens, hash qc, PT(qc) tokens) */
CALLER(AllocPrefix, alive[qa] == qd, op_alloc_pfx(qa, qb, qc))
/* fork(qa, qb): a live parent; a new child, or qb == qa (false) */
CALLER(Fork, alive[qa] && (qa == qb || !alive[qb]), op_fork(qa, qb))
/* append_token_paged(qa, layer qb), with data iff qc */
CALLER(Append, alive[qa] && tok[IDX(qa, qb)] < MAXTOK, op_append(qa, qb, qc))
/* write_kv(qa, layer qb, position qc) */
CALLER(Write, alive[qa] && qc < tok[IDX(qa, qb)], op_write(qa, qb, qc))
/* append_token_all_layers(qa) */
CALLER(AppendAll, alive[qa] && BELOW_MAX(qa), op_append_all(qa))
/* free(qa) */
CALLER(Free, alive[qa], op_free(qa))
/* evict_prefix(hash qa) of a registered hash */
CALLER(EvictPrefix, preg[qa], op_evict_prefix(qa))
/* clear_prefix_cache() */
CALLER(ClearPrefixes, preg[0] || preg[NH - 1], op_clear_prefixes())

init {
  atomic {
    d_step {
      assert(NL <= 2 && NH <= 2 && NP < NONE);
      for (pv : 0 .. NP - 1) { flist[pv] = pv; owner[pv] = NONE }
      nfree = NP;
      for (hv : 0 .. NH - 1) { preg_r[hv] = NONE; lru[hv] = NONE }
      for (xv : 0 .. NH * PMAX - 1) { ppages[xv] = NONE }
      for (xv : 0 .. NR * NL * MAXPPL - 1) { tbl[xv] = NONE }
    }
#include "driver.pml"
  }
}
