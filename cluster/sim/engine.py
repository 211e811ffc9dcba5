"""One simulated vLLM V1 replica: scheduler, paged KV cache with prefix caching, step timing.

Follows ``vllm/v1/core/sched/scheduler.py`` and ``kv_cache_manager.py``:

* Each step has a token budget (``max_num_batched_tokens``). RUNNING requests
  are served first, in admission order, each with the tokens it has not computed
  (1 for a decode, the rest of its prompt for a partial prefill, cut to the
  budget: chunked prefill). Then WAITING requests are admitted in order while
  budget, ``max_num_seqs`` and KV blocks allow, unless this step preempted.
* KV blocks of ``block_size`` tokens, ``num_blocks`` of them (the planner's
  figure). A prompt's full blocks are keyed by chained hashes; a block is cached
  once full and stays cached after its requests finish, as a free block, until
  it is reused. Free blocks form one queue, least recently freed first;
  a request's blocks are freed tail first (so its prefix outlives its tail),
  never-used blocks are handed out before any cached one is evicted.
* A waiting request's cache hit is the longest run of its leading blocks present
  in the cache, at most ``num_tokens - 1`` tokens (the last one is always
  computed); the hit blocks are taken out of the free queue.
* When a RUNNING request needs a block and none is free, the most recently
  admitted running request is preempted: its blocks are freed, it forgets its
  computed tokens (recompute) and goes back to the head of the waiting queue.
* A step's duration comes from ``StepModel``; a request whose computed tokens
  reach its length samples one token at the end of the step.
* With a ``LoraSpec`` (``cluster.sim.lora``), requests may name an adapter: a waiting
  request whose adapter is not among the running requests' while those already number
  ``max_loras`` is skipped (it keeps its place; later ones may go first), as vLLM's
  scheduler does. (vLLM counts the adapters of the running requests scheduled in the step;
  counting all running ones keeps every batch within ``max_loras`` even when the token budget
  leaves a running request out, which vLLM asserts.) A step first loads its batch's
  adapters that have no GPU slot (LRU among those the batch does not use) and, before that,
  those not in host memory; the loads lengthen the step. Without one, nothing changes.

Speed: a step in which every running request decodes and nothing waits is
repeated ``k`` times at once (until the first request finishes or KV runs out),
in O(batch); an arrival cuts it at the next step boundary (``interrupt``).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from itertools import islice
from math import ceil, sqrt

from cluster.planning.hardware import GPU_BLOCK_SIZE
from cluster.routing.policies import LoraRequestsInfo
from cluster.sim.lora import LoraSpec
from cluster.sim.perfmodel import StepModel


def _drain(it) -> None:
    deque(it, maxlen=0)  # run an iterator of side effects at C speed


class SimRequest:
    __slots__ = ("index", "arrival", "prompt", "target", "hashes", "routing_tokens", "num_computed", "num_out",
                 "keys", "first_t", "last_t", "finish_t", "cached_tokens", "admitted", "preemptions", "replica",
                 "adapter")

    def __init__(self, index: int, arrival: float, prompt: int, target: int, hashes: tuple[int, ...],
                 adapter: str | None = None):
        self.index = index
        self.adapter = adapter  # the LoRA adapter it runs with (None: the base model)
        self.arrival = arrival
        self.prompt = prompt
        self.target = target  # output tokens to generate (the trace's output length; ignore_eos)
        self.hashes = hashes  # keys of the prompt's full blocks
        self.routing_tokens = prompt + target
        self.num_computed = 0
        self.num_out = 0
        self.keys: list[int] = []  # KV blocks held, in order
        self.first_t = -1.0
        self.last_t = -1.0
        self.finish_t = -1.0
        self.cached_tokens = 0  # prefix-cache hit at first admission
        self.admitted = False
        self.preemptions = 0
        self.replica = -1


class Replica:
    """A vLLM engine's scheduler and KV cache; the cluster loop drives it with ``submit`` and ``end_step``."""

    def __init__(self, index: int, *, num_blocks: int, model: StepModel, block_size: int = GPU_BLOCK_SIZE,
                 max_num_batched_tokens: int = 8192, max_num_seqs: int = 256, enable_prefix_caching: bool = True,
                 lora: LoraSpec | None = None):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks: {num_blocks} must be > 0")
        self.index = index
        self.num_blocks = num_blocks
        self.block = block_size
        self.model = model
        self.max_batched = max_num_batched_tokens
        self.max_seqs = max_num_seqs
        self.prefix_caching = enable_prefix_caching
        self.free_plain = num_blocks  # never-used blocks
        self.lru: OrderedDict[int, None] = OrderedDict()  # free blocks that still hold a key, oldest first
        self.ref: dict[int, int] = {}  # key -> requests holding the block
        self._last_unique_key = 0  # negative keys: blocks no other request can hit (decode, partial, duplicates)
        self.running: list[SimRequest] = []
        self.waiting: deque[SimRequest] = deque()
        self.busy = False
        self.t_start = 0.0
        self.t_end = 0.0
        self._sched: list[tuple[SimRequest, int]] = []
        self._macro: tuple[float, int, float, float] | None = None  # (t0, k, a, b) of a repeated decode step
        self._all_decode = False  # the current step only decodes (no prompt token in it)
        # What the live replica's stat logger feeds (cluster.serving.calibration.EngineCalibrator.observe_decode):
        # each all-decode step's batch and smallest inter-token latency. None: not calibrating.
        self.calibrator = None
        # Host cores shared with other engines and the serving path (cluster.sim.host): a step's time is
        # multiplied by slowdown(self, now) when it starts. None: the engine has its accelerator to itself.
        self.slowdown: Callable[[Replica, float], float] | None = None
        # statistics
        self.tokens_processed = 0
        self.tokens_generated = 0  # output tokens sampled (vLLM's generation tokens)
        self.preemptions = 0
        self.steps = 0
        self.busy_s = 0.0
        self.itl_values: list[float] = []  # one gap per token (weights: tokens sharing that gap)
        self.itl_weights: list[int] = []
        self.macro_itl: list[tuple[float, float, int, int]] = []  # (a, b, k, n): steps 1..k-1 of a macro
        # LoRA (None: off)
        self.lora = lora
        self.gpu_loras: OrderedDict[str, None] = OrderedDict()  # adapters in GPU slots, least recently used first
        self.cpu_loras: OrderedDict[str, None] = OrderedDict()  # adapters in host memory, likewise
        self.lora_loads = 0  # adapters copied into a GPU slot
        self.lora_disk_loads = 0  # of those, read from disk first
        self.lora_load_s = 0.0  # seconds of steps spent loading
        self.lora_batch_peak = 0  # most distinct adapters in one batch

    # --- KV cache ---------------------------------------------------------

    def used_blocks(self) -> int:
        return self.num_blocks - self.free_plain - len(self.lru)

    def usage(self) -> float:
        return self.used_blocks() / self.num_blocks

    def _free_blocks(self) -> int:
        return self.free_plain + len(self.lru)

    def _new_key(self) -> int:
        self._last_unique_key -= 1
        return self._last_unique_key

    def _evict(self, m: int) -> None:
        """Take ``m`` free blocks: never-used ones first, then the least recently freed (dropping their keys)."""
        plain = min(m, self.free_plain)
        self.free_plain -= plain
        if m > plain:
            lru = self.lru
            _drain(map(lru.pop, list(islice(lru, m - plain))))

    def _alloc(self, req: SimRequest, upto_tokens: int) -> None:
        """Give ``req`` blocks for ``upto_tokens`` tokens; full prompt blocks get their hash (cached)."""
        keys, hashes, ref, lru, b = req.keys, req.hashes, self.ref, self.lru, self.block
        full = min(upto_tokens // b, len(hashes))  # blocks that will be full prompt blocks: cacheable
        start = len(keys)
        # The last block held may have become full: key it by its hash now (vLLM caches full blocks only).
        j = start - 1
        if 0 <= j < full and keys[j] < 0:
            h = hashes[j]
            if h not in ref and h not in lru:
                del ref[keys[j]]
                keys[j] = h
                ref[h] = 1
        end = -(-upto_tokens // b)
        if end <= start:
            return
        self._evict(end - start)
        new = list(hashes[start:full]) if full > start else []
        if new and not (ref.keys().isdisjoint(new) and lru.keys().isdisjoint(new)):
            # another request computed some of these blocks meanwhile: ours are duplicates, never hit
            seen = set()
            for x, h in enumerate(new):
                if h in ref or h in lru or h in seen:
                    new[x] = self._new_key()
                seen.add(h)
        extra = end - start - len(new)
        if extra:
            last = self._last_unique_key
            new.extend(range(last - 1, last - 1 - extra, -1))
            self._last_unique_key = last - extra
        keys.extend(new)
        ref.update(dict.fromkeys(new, 1))

    def _release(self, req: SimRequest) -> None:
        """Free ``req``'s blocks tail first; blocks nobody else holds join the free queue, still cached."""
        ref = self.ref
        tail_first = req.keys[::-1]
        counts = list(map(ref.__getitem__, tail_first))
        if max(counts, default=1) == 1:
            free = tail_first
        else:
            free = []
            for k, c in zip(tail_first, counts):
                if c == 1:
                    free.append(k)
                else:
                    ref[k] = c - 1
        _drain(map(ref.__delitem__, free))
        self.lru.update(dict.fromkeys(free))
        req.keys = []

    def cached_prefix_blocks(self, req: SimRequest) -> int:
        """Leading blocks of ``req``'s prompt in this cache, capped so the last token is computed."""
        limit = (req.prompt + req.num_out - 1) // self.block
        ref, lru, n = self.ref, self.lru, 0
        for h in req.hashes:
            if n >= limit or (h not in ref and h not in lru):
                break
            n += 1
        return n

    def _preempt(self, victim: SimRequest) -> None:
        self._release(victim)
        victim.num_computed = 0
        victim.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)

    # --- scheduling -------------------------------------------------------

    def _schedule(self) -> tuple[list[tuple[SimRequest, int]], bool]:
        budget = self.max_batched
        sched: list[tuple[SimRequest, int]] = []
        running, b = self.running, self.block
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n_new = min(req.prompt + req.num_out - req.num_computed, budget)
            upto = req.num_computed + n_new
            ok = True
            while -(-upto // b) - len(req.keys) > self._free_blocks():
                victim = running.pop()  # the most recently admitted
                self._preempt(victim)
                preempted = True
                if victim is req:
                    ok = False
                    break
            if not ok:
                break
            if upto > len(req.keys) * b or req.num_computed < req.prompt:  # a new block, or prefill to key
                self._alloc(req, upto)
            sched.append((req, n_new))
            budget -= n_new
            i += 1
        if not preempted:
            waiting = self.waiting
            active = self._running_adapters() if self.lora is not None else None
            skipped: list[SimRequest] = []
            while waiting and budget > 0 and len(running) < self.max_seqs:
                req = waiting[0]
                if active is not None and req.adapter is not None and req.adapter not in active \
                        and len(active) >= self.lora.max_loras:
                    skipped.append(waiting.popleft())  # one more adapter than the batch may hold: later
                    continue
                hit = self.cached_prefix_blocks(req) if self.prefix_caching else 0
                computed = hit * b
                n_new = min(req.prompt + req.num_out - computed, budget)
                hit_keys = req.hashes[:hit]
                evictable = sum(1 for h in hit_keys if h in self.lru) if hit else 0
                if -(-(computed + n_new) // b) - hit + evictable > self._free_blocks():
                    break
                waiting.popleft()
                self._admit(req, hit_keys, computed)
                self._alloc(req, computed + n_new)
                running.append(req)
                sched.append((req, n_new))
                budget -= n_new
                if active is not None and req.adapter is not None:
                    active.add(req.adapter)
            if skipped:
                waiting.extendleft(reversed(skipped))  # back at the head, in their order
        return sched, preempted

    def _admit(self, req: SimRequest, hit_keys: tuple[int, ...], computed: int) -> None:
        """A waiting request joins the batch with its cached prefix blocks (out of the free queue if nobody held them)."""
        ref, lru = self.ref, self.lru
        for h in hit_keys:
            if h in lru:
                del lru[h]
                ref[h] = 1
            else:
                ref[h] += 1
        req.keys = list(hit_keys)
        req.num_computed = computed
        if not req.admitted:
            req.admitted = True
            req.cached_tokens = computed

    # --- LoRA ---------------------------------------------------------------

    def _running_adapters(self) -> set[str]:
        return {r.adapter for r in self.running if r.adapter is not None}

    def _load_adapters(self, sched: list[tuple[SimRequest, int]]) -> float:
        """Give the batch's adapters GPU slots (from host memory, or disk first); returns the seconds it takes."""
        lora, gpu, cpu = self.lora, self.gpu_loras, self.cpu_loras
        batch = {req.adapter for req, _ in sched if req.adapter is not None}
        self.lora_batch_peak = max(self.lora_batch_peak, len(batch))
        assert len(batch) <= lora.max_loras, f"a batch of {len(batch)} adapters (max_loras {lora.max_loras})"
        seconds = 0.0
        for name in sorted(batch):
            if name in gpu:
                gpu.move_to_end(name)
                cpu.move_to_end(name)
                continue
            if name in cpu:
                cpu.move_to_end(name)
            else:
                if len(cpu) >= lora.max_cpu_loras:
                    self._evict_adapter(cpu, batch, also=gpu)
                cpu[name] = None
                seconds += lora.disk_load_s
                self.lora_disk_loads += 1
            if len(gpu) >= lora.max_loras:
                self._evict_adapter(gpu, batch)
            gpu[name] = None
            seconds += lora.gpu_load_s
            self.lora_loads += 1
        self.lora_load_s += seconds
        return seconds

    @staticmethod
    def _evict_adapter(lru: OrderedDict[str, None], keep: set[str], also: OrderedDict[str, None] | None = None) -> None:
        """Drop the least recently used adapter the batch does not use (from host memory: from its GPU slot too)."""
        victim = next(name for name in lru if name not in keep)
        del lru[victim]
        if also is not None:
            also.pop(victim, None)

    def resident_adapters(self) -> frozenset[str]:
        """The adapters the engine holds (host memory; the GPU slots are among them): what a replica reports."""
        return frozenset(self.cpu_loras)

    def lora_requests_info(self) -> LoraRequestsInfo:
        """vLLM's ``vllm:lora_requests_info``: adapters with running / waiting requests, and ``max_lora``."""
        return LoraRequestsInfo(frozenset(self._running_adapters()),
                                frozenset(r.adapter for r in self.waiting if r.adapter is not None),
                                self.lora.max_loras if self.lora is not None else 0)

    def _duration(self, sched: list[tuple[SimRequest, int]]) -> tuple[float, bool]:
        """Seconds the step takes, and whether every scheduled request is a plain decode."""
        prefill_tokens, pairs, decodes, context_tokens = 0, 0.0, 0, 0
        for req, n in sched:
            computed = req.num_computed
            if n == 1 and req.num_out and computed == req.prompt + req.num_out - 1:
                decodes += 1
                context_tokens += computed + 1
            else:
                prefill_tokens += n
                pairs += n * (computed + n / 2)
        return self.model.step_ms(prefill_tokens, pairs, decodes, context_tokens) / 1e3, prefill_tokens == 0

    def _start(self, now: float) -> None:
        sched, preempted = self._schedule()
        if not sched:
            self.busy = False
            self._sched = []
            return
        dt, all_decode = self._duration(sched)
        factor = self.slowdown(self, now) if self.slowdown is not None else 1.0
        dt *= factor
        self._all_decode = all_decode
        self.busy = True
        self._sched = sched
        self._macro = None
        self.t_start = now
        if self.lora is not None:
            now += self._load_adapters(sched)  # the step computes once its adapters are in place
        if all_decode and not preempted and not self.waiting and len(sched) == len(self.running):
            k = min(req.target - req.num_out for req, _ in sched)
            k = self._fit_blocks(sched, k)
            if k > 1:
                growth = factor * self.model.c_kv * len(sched) / 1e3  # each step attends one more token per request
                self._macro = (now, k, dt, growth)  # step j (1..k) ends at now + j*dt + growth*j*(j-1)/2
                dt = k * dt + growth * k * (k - 1) / 2
        self.t_end = now + dt

    def _fit_blocks(self, sched: list[tuple[SimRequest, int]], k: int) -> int:
        """Largest k' <= k decode steps whose new blocks the free pool covers."""
        free, b = self._free_blocks(), self.block

        def need(kk: int) -> int:
            return sum(-(-(req.num_computed + kk) // b) - len(req.keys) for req, _ in sched)

        if k <= 1 or need(k) <= free:
            return k
        lo, hi = 1, k  # need(lo) <= free (the first step is allocated), need(hi) > free
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if need(mid) <= free:
                lo = mid
            else:
                hi = mid
        return lo

    # --- driven by the cluster loop ---------------------------------------

    def submit(self, req: SimRequest, now: float) -> bool:
        """Queue a request; True if this replica's step-end time changed (idle start or a cut macro step)."""
        req.replica = self.index
        self.waiting.append(req)
        if not self.busy:
            self._start(now)
            return self.busy
        return self.interrupt(now)

    def interrupt(self, now: float) -> bool:
        """Cut a repeated decode step at the first step boundary after ``now``."""
        if self._macro is None:
            return False
        t0, k, a, b = self._macro
        x = now - t0
        # steps j complete at t0 + j*a + b*j*(j-1)/2; want the smallest j >= 1 with that >= now
        if b > 0:
            j = ceil((-(a - b / 2) + sqrt((a - b / 2) ** 2 + 2 * b * x)) / b - 1e-9)
        else:
            j = ceil(x / a - 1e-9)
        j = max(1, j)
        if j >= k:
            return False
        self._macro = (t0, j, a, b)
        self.t_end = t0 + j * a + b * j * (j - 1) / 2
        return True

    def _calibrate(self, sched: list[tuple[SimRequest, int]], now: float) -> None:
        """Feed the calibrator the all-decode step(s) ending at ``now``, one sample per engine step as the live
        stat logger does; a repeated decode step is its k steps (the last ``window`` of them: all a bucket keeps)."""
        cal, batch = self.calibrator, len(sched)
        if self._macro is None:
            cal.observe_decode(batch, min(now - req.last_t for req, _ in sched))
            return
        t0, k, a, b = self._macro
        first = t0 + a
        cal.observe_decode(batch, min(first - req.last_t for req, _ in sched))
        for j in range(max(2, k - cal.window + 1), k + 1):  # step j takes a + b (j - 1)
            cal.observe_decode(batch, a + b * (j - 1))

    def end_step(self, now: float) -> list[SimRequest]:
        """Apply the step that ends at ``now``; start the next. Returns the requests that finished."""
        done: list[SimRequest] = []
        sched = self._sched
        if self.calibrator is not None and self._all_decode and sched:
            self._calibrate(sched, now)
        if self._macro is not None:
            t0, k, a, b = self._macro
            first = t0 + a
            for req, _ in sched:
                self.itl_values.append(first - req.last_t)
                self.itl_weights.append(1)
                req.num_computed += k
                req.num_out += k
                req.last_t = now
                self._alloc(req, req.num_computed)  # blocks through the last token computed
                if req.num_out >= req.target:
                    done.append(req)
            if k > 1:
                self.macro_itl.append((a, b, k, len(sched)))
            self.tokens_processed += k * len(sched)
            self.tokens_generated += k * len(sched)
            self.steps += k
        else:
            for req, n in sched:
                req.num_computed += n
                self.tokens_processed += n
                if req.num_computed >= req.prompt + req.num_out:
                    req.num_out += 1
                    self.tokens_generated += 1
                    if req.num_out == 1:
                        req.first_t = now
                    else:
                        self.itl_values.append(now - req.last_t)
                        self.itl_weights.append(1)
                    req.last_t = now
                    if req.num_out >= req.target:
                        done.append(req)
            self.steps += 1
        self.busy_s += now - self.t_start
        if done:
            finished = set(id(r) for r in done)
            self.running = [r for r in self.running if id(r) not in finished]
            for req in done:
                req.finish_t = now
                self._release(req)
                req.hashes = ()
        self._start(now)
        return done


def run_alone(replica: Replica, requests: list[SimRequest],
              observe: Callable[[Replica, float], None] | None = None) -> float:
    """Drive one replica through ``requests`` (sorted by arrival) with no router; returns the end time.

    ``observe(replica, now)`` runs after every event, when the next step (if any) is scheduled.
    """
    i, now = 0, 0.0
    while i < len(requests) or replica.busy:
        nxt = requests[i].arrival if i < len(requests) else float("inf")
        if replica.busy and replica.t_end <= nxt:
            now = replica.t_end
            replica.end_step(now)
        else:
            now = nxt
            replica.submit(requests[i], now)
            i += 1
        if observe is not None:
            observe(replica, now)
    return now
