"""The trained policy of preference optimisation: the base U-Net with LoRA adapters (or fully fine-tuned).

docs/method.md section 3 ("fine-tune", "Reference"): the policy is the base U-Net plus LoRA adapters through peft
(``unet.add_adapter(LoraConfig(r, lora_alpha, init_lora_weights="gaussian", target_modules))`` after
``unet.requires_grad_(False)``, docs/prototype.md). The reference model is the SAME U-Net with its adapters
disabled, so no second copy of the weights exists (the official code deep-copies the U-Net; diffusers' DPO
example showed the adapter switch). Only full fine-tuning (``optimize.full_finetune``) needs a frozen copy of
the initial U-Net as the reference, which costs one more U-Net in memory.

Outputs, both readable by stock diffusers:
- ``save_lora(path)``: the adapters in diffusers' LoRA format (``pytorch_lora_weights.safetensors`` with the
  peft config as metadata, so alpha != rank survives), read by ``pipe.load_lora_weights(path)``;
- ``save_merged(path)``: a complete pipeline folder with the adapters fused into the U-Net weights, read by
  ``StableDiffusion(XL)Pipeline.from_pretrained(path)`` and ``lpo.backbones.load_pipeline_folder``.

Checkpoints (``save_checkpoint`` / ``load_checkpoint``, in lpo.checkpoint's format) hold the trainable weights,
the optimiser state, the per-rank random generators and the iteration, written atomically, so a killed run
resumes exactly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict

from lpo import checkpoint
from lpo.backbones import Backbone
from lpo.config import ConfigError, LoraConfig, OptimizeConfig

log = logging.getLogger(__name__)

Mode = Literal["lora", "full"]

# Backbone kind -> the diffusers pipeline class whose LoRA loader reads the saved adapters.
LORA_PIPELINES: dict[str, type] = {
    "shapes": StableDiffusionPipeline,
    "sd15": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save/load_lora_weights use
# optimize.mixed_precision -> dtype of the frozen weights (base U-Net under LoRA, reference copy, reward model)
WEIGHT_DTYPES: dict[str, torch.dtype] = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class PolicyError(ConfigError):
    """A policy that cannot be built or resumed as configured (subclass of ConfigError: one-line CLI error)."""


# --------------------------------------------------------------------------------------------------------
# Configuration checks (before any compute)
# --------------------------------------------------------------------------------------------------------


def check_policy_config(cfg: OptimizeConfig) -> None:
    """Reject a policy configuration that cannot train, naming the key (called before any model is loaded)."""
    if cfg.full_finetune:
        return
    lora = cfg.lora
    if lora.rank < 1:
        raise PolicyError(
            f"optimize.lora.rank: must be >= 1, got {lora.rank} (a rank-0 LoRA has no parameters; "
            "set optimize.full_finetune: true to train every weight)"
        )
    if lora.alpha is not None and not lora.alpha > 0:
        raise PolicyError(f"optimize.lora.alpha: must be > 0 or null (= rank), got {lora.alpha}")
    if not lora.target_modules:
        raise PolicyError("optimize.lora.target_modules: empty; name the modules that get adapters")


def peft_lora_config(lora: LoraConfig) -> PeftLoraConfig:
    """peft's LoraConfig for ``optimize.lora`` (gaussian init: A ~ N(0, 1/r), B = 0, so policy == reference)."""
    return PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
        init_lora_weights="gaussian",
        target_modules=list(lora.target_modules),
    )


# --------------------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------------------


class Policy:
    """The trained U-Net (``self.unet`` = ``backbone.unet``, modified in place) and its reference.

    Use ``trainable_parameters()`` for the optimiser, ``with policy.reference() as ref:`` for reference
    forwards (no_grad; LoRA: the same module with adapters disabled until the block exits), and the save
    methods at the end. The backbone's other parts (text encoders, scheduler, VAE) stay frozen.
    """

    def __init__(self, backbone: Backbone, mode: Mode, ref_unet: Optional[UNet2DConditionModel] = None) -> None:
        self.backbone = backbone
        self.mode: Mode = mode
        self._ref_unet = ref_unet

    @property
    def unet(self) -> UNet2DConditionModel:
        return self.backbone.unet

    @property
    def kind(self) -> str:
        return self.backbone.kind

    # ---- parameters ----------------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.unet.named_parameters() if p.requires_grad}

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return {"trainable": trainable, "unet_total": sum(p.numel() for p in self.unet.parameters())}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights only (LoRA A/B, or the whole U-Net), detached CPU copies, for checkpoints."""
        return {name: p.detach().cpu().clone() for name, p in self.named_trainable().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: str = "<checkpoint>") -> None:
        """Restore ``trainable_state_dict`` output; the names must match exactly (same mode, rank, targets)."""
        params = self.named_trainable()
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise PolicyError(
                f"{source}: trainable weights do not match this policy (changed optimize.lora or "
                f"full_finetune?): missing {missing[:3]}, unexpected {unexpected[:3]}; delete the work folder "
                "to start over"
            )
        with torch.no_grad():
            for name, p in params.items():
                if state[name].shape != p.shape:
                    raise PolicyError(f"{source}: {name} has shape {tuple(state[name].shape)}, "
                                      f"expected {tuple(p.shape)} (changed optimize.lora.rank?)")
                p.copy_(state[name].to(device=p.device, dtype=p.dtype))

    # ---- the reference -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def reference(self) -> Iterator[UNet2DConditionModel]:
        """The reference U-Net under no_grad: adapters disabled (LoRA) or the frozen initial copy (full).

        LoRA: adapters are re-enabled when the block exits, also on an exception. Call the yielded module,
        not a DDP wrapper (the reference needs no gradient synchronisation).
        """
        with torch.no_grad():
            if self.mode == "full":
                yield self._ref_unet
                return
            self.unet.disable_adapters()
            try:
                yield self.unet
            finally:
                self.unet.enable_adapters()

    # ---- outputs -------------------------------------------------------------------------------------------

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapters in diffusers' key format (``...to_q.lora.down.weight``), CPU float32."""
        if self.mode != "lora":
            raise PolicyError("a fully fine-tuned policy has no LoRA weights (optimize.full_finetune is true)")
        peft_sd = get_peft_model_state_dict(self.unet)
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in convert_state_dict_to_diffusers(peft_sd).items()}

    def save_lora(self, path: str | Path) -> Path:
        """Write the adapters so the stock ``pipe.load_lora_weights(path)`` reads them (alpha in the metadata)."""
        path = Path(path)
        if self.mode != "lora":
            raise PolicyError("a fully fine-tuned policy has no LoRA weights (optimize.full_finetune is true)")
        if self.kind not in LORA_PIPELINES:
            raise PolicyError(f"no diffusers LoRA format known for backbone kind {self.kind!r}")
        metadata = self.unet.peft_config["default"].to_dict()
        path.mkdir(parents=True, exist_ok=True)
        LORA_PIPELINES[self.kind].save_lora_weights(
            str(path), unet_lora_layers=self.lora_state_dict(), unet_lora_adapter_metadata=metadata
        )
        return path

    def merged_unet(self) -> UNet2DConditionModel:
        """A float32 copy of the policy U-Net with the adapters fused into the weights (the policy is unchanged).

        Costs one U-Net copy for the moment of saving (the end of a run).
        """
        merged = copy.deepcopy(self.unet)
        if self.mode == "lora":
            merged.fuse_lora()
            merged.unload_lora()
        merged.requires_grad_(False)
        if merged.dtype != torch.float32:
            merged.to(torch.float32)
        return merged.eval()

    def save_merged(self, path: str | Path, info: Optional[dict] = None) -> Path:
        """A complete diffusers pipeline folder (atomic) with the merged U-Net; the base's other parts as they are."""
        merged_backbone = dataclasses.replace(self.backbone, unet=self.merged_unet())
        return merged_backbone.save_pipeline(path, info=info)


def build_policy(
    backbone: Backbone, cfg: OptimizeConfig, weight_dtype: torch.dtype = torch.float32
) -> Policy:
    """Turn ``backbone.unet`` (in place) into the policy; the reference costs no copy for LoRA.

    LoRA: freeze the U-Net, cast its frozen weights to ``weight_dtype`` (fp16/bf16 mixed precision), add the
    adapters (their weights stay float32, as the official code keeps LoRA params in fp32). Full fine-tuning:
    a frozen ``weight_dtype`` deep copy is the reference; the whole U-Net trains in float32.
    The adapters' gaussian init draws from torch's global generator: seed it first for reproducible runs.
    """
    check_policy_config(cfg)
    unet = backbone.unet
    unet.requires_grad_(False)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.full_finetune:
        ref = copy.deepcopy(unet).eval()
        if ref.dtype != weight_dtype:
            ref.to(weight_dtype)
        unet.requires_grad_(True)
        policy = Policy(backbone, "full", ref)
    else:
        if unet.dtype != weight_dtype:
            unet.to(weight_dtype)
        unet.add_adapter(peft_lora_config(cfg.lora))
        for p in unet.parameters():  # only the adapters require grad after add_adapter
            if p.requires_grad:
                p.data = p.data.to(torch.float32)
        if not any(p.requires_grad for p in unet.parameters()):
            raise PolicyError(
                f"optimize.lora.target_modules {cfg.lora.target_modules} matched no module of the U-Net"
            )
        policy = Policy(backbone, "lora")
    counts = policy.parameter_counts()
    log.info("policy: %s, %d trainable of %d U-Net parameters", policy.mode, counts["trainable"], counts["unet_total"])
    return policy


# --------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | Path,
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    iteration: int,
    rng_states: list[torch.Tensor],
    extra: Optional[dict[str, Any]] = None,
) -> None:
    """One file with what an exact resume needs: weights, optimiser, every rank's generator, iteration.

    lpo.checkpoint's format, written to a temporary file and renamed, so a kill never leaves half a checkpoint.
    """
    checkpoint.save_state(path, {
        "mode": policy.mode,
        "iteration": iteration,
        "trainable": policy.trainable_state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": [s.cpu() for s in rng_states],
        "extra": extra or {},
    })


def load_checkpoint(path: str | Path, policy: Policy, optimizer: torch.optim.Optimizer, world_size: int) -> Optional[dict]:
    """Restore weights and optimiser from ``path`` if it exists; returns the state (iteration, rng, extra) or None
    (also, with a warning, for a checkpoint of another format: training starts over).

    The generators are per rank, so a resume must use the same number of processes.
    """
    state = checkpoint.load_state(path, what="policy checkpoint")
    if state is None:
        return None
    if state.get("mode") != policy.mode:
        raise PolicyError(f"{path}: checkpoint of mode {state.get('mode')!r}; this run needs mode {policy.mode!r} "
                          "(delete the work folder)")
    if len(state["rng"]) != world_size:
        raise PolicyError(f"{path}: written by {len(state['rng'])} processes, resumed with {world_size}; "
                          "resume with the same number of processes or delete the work folder")
    policy.load_trainable_state_dict(state["trainable"], str(path))
    optimizer.load_state_dict(state["optimizer"])
    return state


@dataclasses.dataclass
class TrainingStart:
    """What an optimize method's loop starts from: the prepared U-Net and optimiser, this rank's generator,
    the running totals and the first iteration (0, or the checkpoint's)."""

    train_unet: Any
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    totals: Any
    start: int


def start_training(policy: Policy, cfg: OptimizeConfig, accelerator: Any, checkpoint: Path, generator_seed: int,
                   totals_cls: type, unit: str = "iteration") -> TrainingStart:
    """Text encoders to the device, AdamW over the trainable parameters, accelerate's prepare, and a resume from
    ``checkpoint`` when it exists (weights, optimiser, this rank's generator state and ``totals_cls`` totals).
    Shared by the LPO/SPO loop and Diffusion-DPO."""
    device, rank = accelerator.device, accelerator.process_index
    for module in policy.backbone.text_encoders():
        module.to(device)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.lr, betas=(0.9, 0.999),
                                  weight_decay=cfg.weight_decay, eps=1e-8)
    train_unet, optimizer = accelerator.prepare(policy.unet, optimizer)
    generator = torch.Generator().manual_seed(generator_seed)
    totals, start = totals_cls(), 0
    state = load_checkpoint(checkpoint, policy, optimizer, accelerator.num_processes)
    if state is not None:
        start = int(state["iteration"])
        generator.set_state(state["rng"][rank])
        totals = totals_cls(**state["extra"]["totals"])
        log.info("resumed from %s at %s %d", checkpoint, unit, start)
    return TrainingStart(train_unet, optimizer, generator, totals, start)
