"""Memory per device of a Transformer causal LM under DeepSpeed ZeRO 0-3 and FSDP2, from the model's shape,
without allocating it (:func:`model_shape` reads a model on the meta device).

Units: bytes; ``P`` parameters, ``N`` data-parallel processes, ``w`` bytes per weight in the compute precision
(4 fp32, 2 bf16/fp16), ``k`` float32 optimizer states per parameter (AdaBound/Adam 2, AMSBound 3 with
``max_exp_avg_sq``, SGD with momentum 1, plain SGD 0).

Model states (:func:`estimate`), per engine, and what comes and goes around them (``head`` = V h, the output
embedding, whose gradient is the first the backward pass makes):

========  ===========================  ==================  =========================  ==============================
engine    weights                      gradients           optimizer                  during fwd/bwd (buffers)
========  ===========================  ==================  =========================  ==============================
ZeRO-0    w P                          w P (+4 P in bf16)  4 k P (+4 P master, bf16)  -
ZeRO-1    w P (one flat buffer)        w P / N (reduced)   (4 + 4 k) P / N: DeepSpeed  every full gradient until the
                                                           keeps an fp32 copy of its   reduction at the end: w P less
                                                           partition even in fp32      the activations freed by then
ZeRO-2    w P (one flat buffer)        w P / N             (4 + 4 k) P / N            a bucket or one larger gradient
ZeRO-3    w P / N (+ small persistent  w P / N + 8 P / N   4 k P / N (+4 P / N         parameters gathered up to
          parameters whole)            (fp32 buffer and    master in bf16)            stage3_max_live_parameters, a
                                       the master's grad)                             bucket or one larger gradient
FSDP2     4 P / N (fp32 shards)        4 P / N, made by    4 k P / N                  the root gathered, two blocks
                                       each backward pass                             gathered, a block's gradient
========  ===========================  ==================  =========================  ==============================

DeepSpeed's optimizer step copies the partition's gradient to float32 (4 P / N); ZeRO-0 all-reduces through a
flat copy of the gradients; torch's optimizers add their temporaries (``optimizer_temporaries``), bigbatch's
update in place. Building: on CPU the whole float32 model (4 P) exists before any engine shards it; on a GPU
DeepSpeed casts it on the host and moves it (w P; ZeRO-1/2 then flatten it into a new buffer, w P more; ZeRO-3
one parameter at a time), while FSDP2 as bigbatch builds it moves the whole float32 model to the GPU first.
The peak is the larger of the build and training: model states + the largest of (activations + buffers) and
(the step's temporaries); FSDP2's gradients, freed after every step, count at the step only.

Activations (:func:`activation_bytes`), per token of a micro batch (``s`` x ``b`` tokens), ``e`` bytes per
activation (4 fp32, 2 bf16), hidden ``h``, key/value width ``h_kv``, MLP width ``i``, ``a`` heads, vocabulary
``V``. The method is Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
section 4.1: the tensors each operation saves for its backward pass), applied to the Hugging Face blocks with
SDPA attention, which saves q, k, v, its output and a float32 log-sum-exp per head instead of the a s^2 score
and softmax tensors (their 5 a s / h term disappears):

* Llama block: 2 (4 + 2 e) h [two RMSNorms in float32: the float32 input, the normalised value and the output]
  + e (3 h + 2 h_kv) [rotated q, k, v, SDPA's output and o_proj's contiguous input] + 4 e i [SwiGLU: gate,
  SiLU(gate), up, their product] + 4 a [log-sum-exp];
* GPT-2 block: e (9 h + 5 i) + 4 a [two LayerNorms' inputs and outputs, the fused qkv, SDPA's output, c_proj's
  input; the tanh GELU keeps its input, tanh, 0.5 x, 1 + tanh and output];
* the head: the final norm and the loss in float32, whose backward holds log-softmax, the gradient it receives
  and the one it returns: 12 V;
* with activation checkpointing a block keeps only its input (e h) and one block is recomputed at a time.

So a Llama block at e = 2 (bf16) with h_kv = h holds 26 h + 8 i bytes per token, against GPT-3's 34 h + 5 a s
(Korthikanti's count with dropout and materialised attention scores).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

ENGINES = ("zero0", "zero1", "zero2", "zero3", "fsdp2")
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GB = 1e9


@dataclass(frozen=True)
class GPU:
    """A device's memory (bytes, as sold: 80 GB = 80e9) and dense bf16 throughput (FLOP/s)."""

    name: str
    memory: float
    bf16_flops: float


#: known devices; ``--gpu`` takes the key
GPUS: dict[str, GPU] = {
    "h100": GPU("H100 80GB", 80 * GB, 989e12),
    "h200": GPU("H200 141GB", 141 * GB, 989e12),
    "a100": GPU("A100 80GB", 80 * GB, 312e12),
    "a100-40g": GPU("A100 40GB", 40 * GB, 312e12),
    "l40s": GPU("L40S 48GB", 48 * GB, 362e12),
    "l4": GPU("L4 24GB", 24 * GB, 121e12),
}


def gpu_named(device_name: str) -> str | None:
    """The key of :data:`GPUS` that a CUDA device's name (``torch.cuda.get_device_name``) names: every part
    of the key in the name (``a100-40g`` for ``NVIDIA A100-SXM4-40GB``, ``a100`` for the 80 GB part); None
    for another device."""
    name = device_name.lower()
    for key in sorted(GPUS, key=lambda k: -len(k.split("-"))):
        if all(part in name for part in key.split("-")):
            return key
    return None


#: what a CUDA process holds besides its tensors (context, NCCL buffers, the caching allocator's slack), assumed
CUDA_RESERVE = 3 * GB


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs of a model (element counts)."""

    arch: str  # llama | gpt2
    params: int  # unique parameters
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    block_params: int  # the largest Transformer block
    root_params: int  # outside the blocks: embeddings, final norm, an untied head
    tensor_sizes: tuple[int, ...] = ()  # every unique parameter tensor


def model_shape(model, arch: str) -> ModelShape:
    """The :class:`ModelShape` of a ``transformers`` Llama or GPT-2 causal LM (on any device, meta included)."""
    cfg = model.config
    unique = {id(p): p for p in model.parameters()}
    blocks = max((m for m in model.modules() if type(m).__name__ == "ModuleList"),
                 key=lambda m: sum(p.numel() for p in m.parameters()))
    block_ids = {id(p) for p in blocks.parameters()}
    block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    if arch == "llama":
        inter, heads, kv = cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads
        hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    else:
        hidden, layers, heads = cfg.n_embd, cfg.n_layer, cfg.n_head
        inter, kv = cfg.n_inner or 4 * hidden, heads
    return ModelShape(arch, sum(p.numel() for p in unique.values()), layers, hidden, inter, heads, kv, cfg.vocab_size,
                      block, sum(p.numel() for i, p in unique.items() if i not in block_ids),
                      tuple(sorted(p.numel() for p in unique.values())))


@dataclass(frozen=True)
class Strategy:
    """How an engine holds the model. Bucket sizes in elements, as DeepSpeed's config gives them."""

    engine: str  # zero0 .. zero3 | fsdp2
    world: int  # processes sharing the model states (data parallel)
    precision: str = "fp32"  # fp32 | bf16 | fp16
    states: int = 2  # float32 optimizer states per parameter
    reduce_bucket: int = 500_000_000
    allgather_bucket: int = 500_000_000
    prefetch_bucket: int = 50_000_000  # ZeRO-3
    persistence_threshold: int = 100_000  # ZeRO-3: parameters this small stay whole on every rank
    max_live_parameters: int = 1_000_000_000  # ZeRO-3
    activation_checkpointing: bool = False
    # the optimizer step's float32 temporaries, in tensors as large as those it updates at once: all of this
    # rank's (foreach, and DeepSpeed's one flat partition) or the largest one (one tensor at a time)
    optimizer_temporaries: float = 0.0
    optimizer_foreach: bool = True
    device: str = "cuda"  # cuda | cpu (the model is built in host memory first)
    # CPU: glibc keeps freed chunks below its mmap threshold (32 MB at most) in the heap, so resident memory holds
    # the freed activations through the optimizer step; off when MALLOC_MMAP_THRESHOLD_ is set low
    heap_retains: bool = False

    @staticmethod
    def from_deepspeed(ds: Mapping, world: int, *, states: int, activation_checkpointing: bool = False,
                       optimizer_temporaries: float = 0.0, optimizer_foreach: bool = True,
                       device: str = "cuda", heap_retains: bool = False) -> "Strategy":
        """From a resolved DeepSpeed config dict (its ``zero_optimization`` and precision blocks), with
        DeepSpeed's defaults where a key is absent."""
        zero = ds.get("zero_optimization", {}) or {}
        precision = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") \
            else "fp32"

        def num(key, default):
            v = zero.get(key, default)
            return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default

        return Strategy(f"zero{int(zero.get('stage', 0))}", world, precision, states,
                        num("reduce_bucket_size", 500_000_000), num("allgather_bucket_size", 500_000_000),
                        num("stage3_prefetch_bucket_size", 50_000_000),
                        num("stage3_param_persistence_threshold", 100_000),
                        num("stage3_max_live_parameters", 1_000_000_000), activation_checkpointing,
                        optimizer_temporaries, optimizer_foreach, device, heap_retains)


@dataclass
class MemoryEstimate:
    """Bytes per device, each part of the model states and the activations; ``peak`` is what to compare
    with a device's memory (and with a measured peak)."""

    engine: str
    weights: float
    gradients: float
    optimizer: float  # float32 master copy and the states
    activations: float  # held at the start of the backward pass
    buffers: float  # DeepSpeed's buckets, gathered ZeRO-3 / FSDP2 parameters
    step: float  # the optimizer step's temporaries
    build: float  # building the model and the engine
    retained: float = 0.0  # CPU: freed activations the allocator keeps resident through the optimizer step
    gradients_held: bool = True  # False: they are freed after each step, made again by the backward pass

    @property
    def states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def training(self) -> float:
        """The largest of the forward/backward pass and the optimizer step."""
        held = self.weights + self.optimizer + (self.gradients if self.gradients_held else 0.0)
        at_step = self.step + self.retained + (0.0 if self.gradients_held else self.gradients)
        return held + max(self.activations + self.buffers, at_step)

    @property
    def peak(self) -> float:
        return max(self.build, self.training)

    def rows(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k not in ("engine", "gradients_held")}, "states": self.states,
                "peak": self.peak}


def optimizer_states(optimizer_class, hparams: Mapping) -> int:
    """Float32 state tensors per parameter: AdaBound, Adam, AdamW, RAdam 2 (``amsgrad``: 3), AMSBound 3
    (``max_exp_avg_sq``), SGD 1 with momentum else 0, RMSprop 1 (+1 momentum, +1 centered); others 2."""
    from bigbatch.optim.adabound import AMSBound

    name = optimizer_class.__name__.lower()
    if issubclass(optimizer_class, AMSBound) or hparams.get("amsbound") or hparams.get("amsgrad"):
        return 3
    if name == "sgd":
        return 1 if hparams.get("momentum", 0) else 0
    if name == "rmsprop":
        return 1 + bool(hparams.get("momentum", 0)) + bool(hparams.get("centered", False))
    return 2


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, element_bytes: int, *,
                     checkpointing: bool = False, head: bool = True) -> float:
    """Activations held at the start of the backward pass of one micro batch (bytes; module docstring);
    ``head=False``: the blocks' only."""
    e, h, i = element_bytes, shape.hidden, shape.intermediate
    h_kv = shape.hidden * shape.kv_heads // shape.heads
    if shape.arch == "llama":
        block, final_norm = 2 * (4 + 2 * e) * h + e * (3 * h + 2 * h_kv) + 4 * e * i + 4 * shape.heads, (4 + 2 * e) * h
    else:
        block, final_norm = e * (9 * h + 5 * i) + 4 * shape.heads, 2 * e * h
    kept = shape.layers * e * h + block if checkpointing else shape.layers * block
    return micro_batch * seq_len * (kept + (final_norm + 12 * shape.vocab if head else 0))


def estimate(shape: ModelShape, strategy: Strategy, micro_batch: int, seq_len: int) -> MemoryEstimate:
    """Bytes per device of ``shape`` trained with ``strategy`` at ``micro_batch`` sequences of ``seq_len``."""
    s = strategy
    if s.engine not in ENGINES:
        raise ValueError(f"engine: {s.engine!r} is not one of {list(ENGINES)}")
    P, N, k = shape.params, s.world, s.states
    w = PRECISION_BYTES[s.precision]
    mixed = w < 4
    act = activation_bytes(shape, micro_batch, seq_len, w, checkpointing=s.activation_checkpointing)
    largest = max(shape.tensor_sizes, default=P)
    cpu = s.device == "cpu"
    head = shape.vocab * shape.hidden  # the output embedding's gradient
    if s.engine == "zero0":
        weights, grads = w * P, w * P + (4 * P if mixed else 0)
        optim = 4 * k * P + (4 * P if mixed else 0)
        buffers = 0.0
        # the all-reduce's flat copy of the gradients
        step = max(w * min(P, s.allgather_bucket),
                   4 * s.optimizer_temporaries * (P if s.optimizer_foreach else largest))
        build = 4 * P if cpu else w * P  # cast on the host, then moved
    elif s.engine in ("zero1", "zero2"):
        weights = w * P
        # the reduced partition of the gradients stays. The backward pass starts with the activations and the
        # head's gradient (the first one made); ZeRO-1 then holds every full gradient until the reduction at its
        # end (while the activations go), ZeRO-2 a bucket of them, or one gradient larger than a bucket
        grads = w * P / N
        optim = (4 + 4 * k) * P / N
        if s.engine == "zero1":
            buffers = max(w * head, w * P - act)
        else:
            buffers = w * max(min(P, s.reduce_bucket), head)
        step = (4 + 4 * s.optimizer_temporaries) * P / N  # the partition's gradient in float32, the update's
        build = (4 * P if cpu else w * P) + w * P  # the weights and their flat copy
    elif s.engine == "zero3":
        persistent = sum(n for n in shape.tensor_sizes if n <= s.persistence_threshold)
        sharded = P - persistent
        weights = w * (sharded / N + persistent)
        # the partitioned gradients, the float32 buffer allocated with the states, and the float32 gradient of the
        # partition, which stays the master's .grad after the step
        grads = w * P / N + 8 * P / N
        optim = (4 * k + (4 if mixed else 0)) * P / N  # in fp32 the partition is its own master copy
        # gathered parameters stay until stage3_max_live_parameters (DeepSpeed's default 1e9 keeps every one
        # of a model below 1B parameters gathered from its forward to its backward)
        buffers = w * min(sharded, max(s.max_live_parameters, 2 * shape.block_params + shape.root_params)) + \
            w * max(min(P, s.reduce_bucket), head)
        step = (4 + 4 * s.optimizer_temporaries) * P / N
        build = (4 * P if cpu else 0) + weights + 4 * largest  # moved and partitioned one parameter at a time
    else:  # fsdp2
        weights = 4 * P / N
        grads = 4 * P / N
        optim = 4 * k * P / N
        # the root's parameters (embeddings) stay gathered through forward and backward; two blocks at a time
        # (one computing, one prefetched), and a block's unsharded gradient before its reduce-scatter
        buffers = w * (shape.root_params + 2 * shape.block_params) + 4 * shape.block_params
        step = 4 * s.optimizer_temporaries * (P if s.optimizer_foreach else largest) / N
        build = 4 * P + 4 * shape.block_params / N  # the whole float32 model is moved to the device, then sharded
    # The blocks' activations are tensors of a few MB, below glibc's mmap threshold: with heap_retains they stay
    # resident once freed, through the optimizer step (the head's large tensors go back to the system)
    retained = activation_bytes(shape, micro_batch, seq_len, w, checkpointing=s.activation_checkpointing,
                                head=False) if s.heap_retains else 0.0
    # FSDP2's engine sets the gradients to None after each step: the backward pass makes them while the
    # activations go, so they count at the step rather than beside the activations
    return MemoryEstimate(s.engine, weights, grads, optim, act, buffers, step, build, retained,
                          gradients_held=s.engine != "fsdp2")


def largest_micro_batch(shape: ModelShape, strategy: Strategy, seq_len: int, budget: float,
                        limit: int = 4096) -> int:
    """The largest micro batch (sequences) whose :func:`estimate` peak fits ``budget`` bytes; 0 if none."""
    if estimate(shape, strategy, 1, seq_len).peak > budget:
        return 0
    lo, hi = 1, 2
    while hi <= limit and estimate(shape, strategy, hi, seq_len).peak <= budget:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if estimate(shape, strategy, mid, seq_len).peak <= budget else (lo, mid)
    return lo
