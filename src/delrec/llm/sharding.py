"""``sharding: fsdp``: the frozen backbone's decoder layers sharded across the ranks with FSDP2.

Under torchrun (:mod:`delrec.distributed`) each decoder layer of a decoder-only backbone becomes a
``torch.distributed.fsdp.fully_shard`` unit, then the decoder stack (the root): a rank keeps 1/world of
every layer's frozen weights and gathers a layer's full weights only while that layer runs (forward, and
again in backward), freeing them after. What is sharded and what is not, and why:

- The decoder layers' frozen base weights: sharded (most of a backbone's weights: 106M of SmolLM2-135M's
  135M, ~96% of a 7B Llama's).
- The input embeddings and the output head (tied to them in SmolLM2 and tiny-llama) stay whole on every
  rank: the candidate scorer (:mod:`delrec.llm.scoring`) calls them directly, outside any forward whose
  FSDP hooks would gather them (and the soft prompt is spliced into the embeddings' output). The
  decoder stack itself is always called through its ``__call__`` (prefix and packed scoring alike), so
  its hooks and its layers' fire; its own weights (the final norm) are sharded as the root unit.
- Trainable parameters stay whole and outside FSDP (``ignored_params``): the peft adapter's tensors
  inside the layers' projections (``lora_*``, AdaLoRA's ``ranknum``) and the soft prompt, which is no
  parameter of the model. FSDP therefore reduce-scatters no gradient: the stages keep summing the
  trainable gradients explicitly (:func:`delrec.distributed.sum_gradients`), AdaLoRA's rank allocator,
  gradient clipping and the optimiser see plain full tensors, and checkpoints and the saved adapter are
  the same files as with ``replicate`` (a run resumes with any world size or sharding; evaluate loads
  the adapter as before). The adapters are well under 1% of a backbone's weights.

Everything that reads the base weights whole is done before sharding: the weights' fingerprint and the
saved copy of a tiny random backbone. Results equal ``replicate``'s up to floating-point noise.

One cost: under autograd (training steps) the scorer runs every prompt whole instead of running the
prompts' shared prefix once into a KV cache (:func:`delrec.llm.scoring._score_decoder_only` says why:
FSDP re-gathers a layer's weights for backward only from hooks on the output of the same call).
Validation and scoring without gradients still share the prefix. Peak memory per rank is the whole
embeddings and output head, 1/world of the layers, plus one or two layers gathered at a time.

Not sharded: encoder-decoder backbones (T5; the scorer calls the encoder and the whole model separately,
which FSDP's one-root rule does not allow) are refused, and the evaluate stage holds the whole backbone
on every rank (it has no ``sharding`` setting). In one process ``sharding: fsdp`` is ``replicate``.
"""

from __future__ import annotations

import logging

from torch import nn

from delrec import distributed
from delrec.errors import DelrecError
from delrec.llm.backbone import Backbone

log = logging.getLogger(__name__)

_LAYER_LISTS = ("layers", "h", "blocks", "block")  # Llama/Qwen/Mistral, GPT-2, others


def decoder_stack(model: nn.Module) -> nn.Module:
    """The transformer stack under the language-model head (LlamaModel, GPT2Model, ...)."""
    return getattr(model, model.base_model_prefix)


def decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    for name in _LAYER_LISTS:
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    raise DelrecError(
        f"sharding: fsdp found no list of decoder layers ({', '.join(_LAYER_LISTS)}) in "
        f"{type(decoder).__name__}",
        field="sharding",
    )


def held_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds (a sharded parameter: its local shard only)."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    return total


def shard_backbone(backbone: Backbone) -> None:
    """Shard ``backbone``'s decoder layers across torchrun's ranks (see the module doc); in one process
    nothing happens. Call it once the model is final (peft adapter injected), before the optimiser."""
    world = distributed.world_size()
    if world == 1:
        log.info("sharding: fsdp in one process: the backbone is held whole (as replicate)")
        return
    if backbone.is_encoder_decoder:
        raise DelrecError(
            f"sharding: fsdp supports decoder-only backbones; {backbone.name} is encoder-decoder: "
            "use sharding: replicate",
            field="sharding",
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    backbone.fingerprint()  # read from the whole weights, once
    model = backbone.base_model()
    whole = held_bytes(model)
    kept = {
        param
        for name, param in model.named_parameters()
        if param.requires_grad or "lora_" in name or "ranknum" in name
    }
    kept |= set(backbone.input_embeddings.parameters())
    head = model.get_output_embeddings()
    if head is not None:
        kept |= set(head.parameters())
    mesh = init_device_mesh(backbone.device.type, (world,))
    decoder = decoder_stack(model)
    for layer in decoder_layers(decoder):
        fully_shard(
            layer, mesh=mesh, reshard_after_forward=True, ignored_params=kept & set(layer.parameters())
        )
    fully_shard(decoder, mesh=mesh, ignored_params=kept & set(decoder.parameters()))
    backbone.sharded = True
    log.info(
        "sharding: fsdp over %d ranks: this rank holds %.2f MB of the backbone's %.2f MB of parameters",
        world,
        held_bytes(model) / 2**20,
        whole / 2**20,
    )
