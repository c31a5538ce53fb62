"""A demo text-to-image model: a tiny Stable Diffusion pipeline trained on CPU on digits.

The diffusers ``StableDiffusionPipeline`` keeps Stable Diffusion's architecture (a CLIP text
encoder, a UNet with cross-attention, a KL autoencoder) at toy widths. It draws 16x16 handwritten
digits from prompts such as ``"a handwritten digit seven"``; nothing is downloaded: the tokenizer
vocabulary is written here, the components are built from configs and trained on scikit-learn's
digits (train split only), once, then cached. An independent judge
(:func:`~nnobfuscator.zoo.judge.load_judge`) scores prompt adherence.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nnobfuscator.core.data import Split
from nnobfuscator.zoo import classifiers
from nnobfuscator.zoo.cache import cache_dir
from nnobfuscator.zoo.judge import load_judge, real_digits
from nnobfuscator.zoo.prompts import (
    DIGIT_WORDS,
    MAX_TOKENS,
    PHRASINGS,
    build_tokenizer,
    prompt_for,
    prompt_splits,
)

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from torch import nn

__all__ = [
    "DEFAULT_CALL",
    "DIGIT_WORDS",
    "IMAGE_SIZE",
    "MAX_TOKENS",
    "PHRASINGS",
    "RECIPE",
    "DiffusionRecipe",
    "build_pipeline",
    "build_tokenizer",
    "generate",
    "load_zoo_pipeline",
    "prompt_adherence",
    "prompt_for",
    "prompt_splits",
    "train_pipeline",
    "zoo_pipeline_folder",
]

IMAGE_SIZE = 16
LATENT_SIZE = IMAGE_SIZE // 2  # the autoencoder downsamples once
TEXT_WIDTH = 64  # the text encoder's hidden size, the UNet's cross-attention width
DEFAULT_CALL: dict[str, Any] = {
    "num_inference_steps": 20,
    "guidance_scale": 4.0,
    "height": IMAGE_SIZE,
    "width": IMAGE_SIZE,
}

_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": TEXT_WIDTH,
    "intermediate_size": 2 * TEXT_WIDTH,
    "projection_dim": TEXT_WIDTH,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
_UNET: dict[str, Any] = {
    "sample_size": LATENT_SIZE,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": TEXT_WIDTH,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
_AUTOENCODER: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": IMAGE_SIZE,
}
_SCHEDULER: dict[str, Any] = {  # Stable Diffusion's betas
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def build_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """An untrained tiny Stable Diffusion pipeline for 16x16 images (weights fixed by ``seed``).

    A 2-layer CLIP text encoder (width 64), a UNet on 4x8x8 latents (widths 32 and 64, 1M
    weights; cross-attention at 4x4: in its second block and the middle one), a KL autoencoder
    16x16 -> 8x8 (widths 16 and 32) and a DDIM scheduler with Stable Diffusion's betas; no
    safety checker. Pipeline progress bars are off.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_tokenizer(folder)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **_TEXT_ENCODER,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config)
        unet = UNet2DConditionModel(**_UNET)
        vae = AutoencoderKL(**_AUTOENCODER)
    scheduler = DDIMScheduler(**_SCHEDULER)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(frozen=True)
class DiffusionRecipe:
    """How the demo pipeline is trained (everything that decides its weights).

    The default takes about 12 minutes on one CPU thread (about 7 on two free cores) and draws
    the prompted digit for all 300 test prompts at :data:`DEFAULT_CALL`.

    Args:
        vae_steps, vae_lr, kl_weight: autoencoder training first (AdamW, cosine schedule;
            reconstruction MSE + ``kl_weight`` x KL per latent value).
        steps, lr: then the UNet and the text encoder together (AdamW, warm-up and cosine
            schedule; DDPM noise-prediction MSE over 1000 timesteps).
        batch_size: random train images per step (both stages).
        prompt_dropout: share of training prompts replaced by ``""`` (classifier-free guidance).
        ema_decay: the UNet and text encoder end with this exponential moving average of their
            weights (with warm-up).
    """

    vae_steps: int = 400
    vae_lr: float = 2e-3
    kl_weight: float = 1e-3
    steps: int = 4000
    lr: float = 1e-3
    batch_size: int = 64
    prompt_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0
    revision: int = 1  # bump when build_pipeline or the training loop changes

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "builder": f"sd-tiny/r{self.revision}",
            "image_size": IMAGE_SIZE,
            "threads": classifiers.TRAIN_THREADS,
        }


RECIPE = DiffusionRecipe()


def _train_pixels() -> tuple[torch.Tensor, torch.Tensor]:
    """Train-split digits as ``(N, 3, 16, 16)`` pixels in [-1, 1], and their labels."""
    train = real_digits(IMAGE_SIZE)["train"]
    return train.images * 2 - 1, train.labels


def _cosine_lr(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train_autoencoder(
    vae: nn.Module, pixels: torch.Tensor, recipe: DiffusionRecipe, bar: tqdm
) -> float:
    """Train the KL autoencoder in place; returns its latent scaling factor (1 / latent std)."""
    generator = torch.Generator().manual_seed(recipe.seed)  # random draws on the CPU
    device = next(vae.parameters()).device
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    schedule = _cosine_lr(optimizer, recipe.vae_steps, warmup=50)
    vae.train()
    for _ in range(recipe.vae_steps):
        index = torch.randint(len(pixels), (recipe.batch_size,), generator=generator)
        batch = pixels[index].to(device)
        posterior = vae.encode(batch).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        latents = posterior.mean + posterior.std * noise
        reconstruction = vae.decode(latents).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = F.mse_loss(reconstruction, batch) + recipe.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.update(1)
        bar.set_postfix(stage="autoencoder", loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        means = vae.encode(pixels.to(device)).latent_dist.mean
    return float(1.0 / means.std())


def _train_denoiser(
    pipe: StableDiffusionPipeline,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    recipe: DiffusionRecipe,
    bar: tqdm,
) -> None:
    """Train the UNet and the text encoder in place on the DDPM noise-prediction loss."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    device = pipe.unet.device
    with torch.no_grad():
        posterior = pipe.vae.encode(pixels.to(device)).latent_dist
    scale = pipe.vae.config.scaling_factor
    means, stds = (posterior.mean * scale).cpu(), (posterior.std * scale).cpu()
    prompts = [prompt_for(d, p) for d in range(10) for p in range(len(PHRASINGS))] + [""]
    table = pipe.tokenizer(
        prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    unet, text_encoder = pipe.unet, pipe.text_encoder
    parameters = [p for m in (unet, text_encoder) for p in m.parameters()]
    average = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=1e-2)
    schedule = _cosine_lr(optimizer, recipe.steps, warmup=200)
    unet.train()
    text_encoder.train()
    size = recipe.batch_size
    for step in range(recipe.steps):
        index = torch.randint(len(pixels), (size,), generator=generator)
        phrasing = torch.randint(len(PHRASINGS), (size,), generator=generator)
        row = labels[index] * len(PHRASINGS) + phrasing
        row[torch.rand(size, generator=generator) < recipe.prompt_dropout] = len(prompts) - 1
        latents = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(
            noise_scheduler.config.num_train_timesteps, (size,), generator=generator
        )
        noisy = noise_scheduler.add_noise(latents, noise, timesteps).to(device)
        states = text_encoder(table[row].to(device))[0]
        prediction = unet(noisy, timesteps.to(device), encoder_hidden_states=states).sample
        loss = F.mse_loss(prediction, noise.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(average, [p.detach() for p in parameters], 1 - decay)
        bar.update(1)
        bar.set_postfix(stage="denoiser", loss=f"{loss.item():.4f}")
    with torch.no_grad():
        for parameter, value in zip(parameters, average, strict=True):
            parameter.copy_(value)
    unet.eval()
    text_encoder.eval()


def train_pipeline(
    recipe: DiffusionRecipe = RECIPE, *, progress: bool = True, device: str = "cpu"
) -> tuple[StableDiffusionPipeline, float]:
    """Build and train the demo pipeline with ``recipe`` (the caller's thread count); returns it
    and the training seconds."""
    pixels, labels = _train_pixels()
    pipe = build_pipeline(recipe.seed).to(device)
    start = time.perf_counter()
    total = recipe.vae_steps + recipe.steps
    description = "training sd-digits (once; cached)"
    with tqdm(total=total, desc=description, disable=not progress, unit="step") as bar:
        torch.manual_seed(recipe.seed)
        scale = _train_autoencoder(pipe.vae, pixels, recipe, bar)
        pipe.vae.register_to_config(scaling_factor=scale)
        _train_denoiser(pipe, pixels, labels, recipe, bar)
    return pipe, time.perf_counter() - start


@torch.inference_mode()
def generate(
    pipe: StableDiffusionPipeline, prompts: list[str], seeds: torch.Tensor, **call: Any
) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` in [0, 1] for prompts, one generator per sample seeded by
    ``seeds``; ``call`` overrides :data:`DEFAULT_CALL`."""
    options = {**DEFAULT_CALL, **call}
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return pipe(prompts, generator=generators, output_type="pt", **options).images


@torch.inference_mode()
def prompt_adherence(
    pipe: StableDiffusionPipeline,
    judge: nn.Module,
    split: Split,
    *,
    batch_size: int = 100,
    progress: bool = False,
    **call: Any,
) -> float:
    """Share of a prompt split's images that ``judge`` labels as the prompted digit.

    Args:
        call: pipeline options over :data:`DEFAULT_CALL` (steps, guidance scale, ...).
    """
    correct = 0
    prompts, seeds = split.inputs["prompt"], split.inputs["seed"]
    for begin in tqdm(range(0, len(split), batch_size), disable=not progress, desc="judging"):
        end = begin + batch_size
        images = generate(pipe, prompts[begin:end], seeds[begin:end], **call)
        predicted = judge(images).argmax(1).cpu()
        correct += int((predicted == split.labels[begin:end].cpu()).sum())
    return correct / len(split)


def zoo_pipeline_folder(recipe: DiffusionRecipe = RECIPE) -> Path:
    """Where the pipeline trained with ``recipe`` is cached (``sd-digits-<recipe digest>``)."""
    digest = hashlib.sha256(json.dumps(recipe.as_dict(), sort_keys=True).encode()).hexdigest()
    return cache_dir() / f"sd-digits-{digest[:8]}"


def load_zoo_pipeline(
    progress: bool = True, *, recipe: DiffusionRecipe = RECIPE, retrain: bool = False
) -> tuple[StableDiffusionPipeline, dict[str, Any]]:
    """The demo pipeline trained on digits: from the cache, or trained now and cached.

    Training takes minutes (:class:`DiffusionRecipe`), on ``TRAIN_THREADS`` threads as the other
    zoo models, so that the same recipe gives the same weights.

    The pipeline is saved with ``save_pretrained`` in ``sd-digits-<digest>`` of
    :func:`~nnobfuscator.zoo.cache.cache_dir` (the digest of the recipe), its info in
    ``nnobf_info.json`` inside; it is written to a temporary folder first, then renamed.

    Returns:
        The pipeline (progress bars off) and its info: recipe, training seconds and the prompt
        adherence of the test prompts at :data:`DEFAULT_CALL`, as scored by the judge.
    """
    from diffusers import StableDiffusionPipeline

    settings = recipe.as_dict()
    folder = zoo_pipeline_folder(recipe)
    info_path = folder / "nnobf_info.json"
    if info_path.is_file() and not retrain:
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe, json.loads(info_path.read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(classifiers.TRAIN_THREADS)
    try:
        pipe, seconds = train_pipeline(recipe, progress=progress)
        judge = load_judge(progress=progress)
        adherence = prompt_adherence(pipe, judge, prompt_splits()["test"], progress=progress)
    finally:
        torch.set_num_threads(threads)
    info = {
        "model": "sd-digits",
        "dataset": "digits",
        "image_size": IMAGE_SIZE,
        "recipe": settings,
        "call": DEFAULT_CALL,
        "torch": torch.__version__,
        "train_seconds": round(seconds, 1),
        "test_prompt_adherence": adherence,
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=cache_dir()))
    try:
        pipe.save_pretrained(str(staging), safe_serialization=True)
        (staging / "nnobf_info.json").write_text(json.dumps(info, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return pipe, info
