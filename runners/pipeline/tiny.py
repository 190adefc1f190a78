"""A tiny, random-weight FLUX.1 model in diffusers layout, built entirely offline.

Why: tests and local development need to exercise the *real* loading path
(``FluxInpaintPipeline.from_pretrained(folder)``) without downloading the
~30 GB FLUX.1-dev checkpoint. So instead of mocking the pipeline we build the
true FLUX.1 architecture (same classes, same scheduler/VAE settings) at toy
sizes, save it exactly as the hub repo is laid out, and load it like the real
thing. Weights are random but deterministic: every module is constructed right
after ``torch.manual_seed(<its own seed>)``, so the output does not depend on
construction order and two writes are byte-for-byte the same tensors.

Tokenizers are built in code (no hub, no sentencepiece files): a byte-level
CLIP BPE vocabulary with no merges, and a small T5-style Unigram vocabulary
(pad=0, eos=1, unk=2 as in T5) that covers ASCII and maps anything else to unk.

Usage: ``python -m runners.pipeline.tiny DIR`` writes the model to DIR; with ``--transformer-file
FILE [--layout bfl|comfy-fp8]`` also its transformer as one file, as FLUX_TRANSFORMER_FILE takes it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# Bump whenever the written layout or weights change: it names the cache folder.
TINY_FORMAT_VERSION = 1
MARKER_NAME = "tiny_model_complete.json"
SAFETY_CHECKER_SUBFOLDER = "safety_checker"

# Per-component seeds, so each module's weights are independent of build order.
_SEEDS = {"transformer": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3, "safety_checker": 4}

# A few whole-word pieces so common prompts do not tokenize to single characters.
_T5_WORDS = (
    "a an the of and in on with to is at by for from photo photograph picture painting "
    "cat dog man woman person red blue green white black sky sea tree house car "
    "portrait landscape high quality detailed"
).split()


def _clip_tokenizer():
    """Byte-level CLIP BPE: all 256 byte-unicode chars, their `</w>` forms, then the specials."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())  # the 256 byte-unicode characters, in a fixed order
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    # transformers 5 tokenizers take the vocab/merges in memory; no files needed.
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():
    """T5-style Unigram tokenizer (pad=0, eos=1, unk=2); unknown characters become <unk>."""
    # In transformers 5, T5TokenizerFast is an alias of T5Tokenizer (tokenizers-backed).
    from transformers import T5TokenizerFast

    printable = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -8.0)]
    vocab += [("\u2581" + w, -5.0) for w in _T5_WORDS]
    vocab += [("\u2581" + c, -9.0) for c in printable]
    vocab += [(c, -10.0) for c in printable]
    # extra_ids=0: no sentinel tokens, so len(tokenizer) == len(vocab).
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def build_tiny_components() -> dict[str, object]:
    """Build all pipeline components plus `safety_checker`/`feature_extractor` (not pipeline parts)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        T5Config,
        T5EncoderModel,
    )

    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    clip_text = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    c: dict[str, object] = {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2}
    # fork_rng: seeding here must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEEDS["transformer"])
        c["transformer"] = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        torch.manual_seed(_SEEDS["vae"])
        # 4 blocks => vae_scale_factor 8; shift/scale/latent_channels are FLUX.1's real VAE values.
        c["vae"] = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 16, 32, 32),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=8,
            sample_size=32,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.1159,
            scaling_factor=0.3611,
        )
        torch.manual_seed(_SEEDS["text_encoder"])
        c["text_encoder"] = CLIPTextModel(CLIPTextConfig(**clip_text))  # pooled dim 32
        torch.manual_seed(_SEEDS["text_encoder_2"])
        c["text_encoder_2"] = T5EncoderModel(
            T5Config(
                d_model=32,
                d_ff=37,
                d_kv=8,
                num_heads=4,
                num_layers=2,
                feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=8,
                vocab_size=len(tokenizer_2),
                pad_token_id=tokenizer_2.pad_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
                decoder_start_token_id=tokenizer_2.pad_token_id,
            )
        )
        torch.manual_seed(_SEEDS["safety_checker"])
        # Default concept weights (ones) mean it never flags: cosine similarity is <= 1.
        c["safety_checker"] = StableDiffusionSafetyChecker(
            CLIPConfig(
                text_config=clip_text,
                vision_config=dict(
                    hidden_size=32,
                    intermediate_size=37,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    image_size=32,
                    patch_size=4,
                ),
                projection_dim=32,
            )
        )
    c["feature_extractor"] = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # FLUX.1-dev's scheduler config.
    c["scheduler"] = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    for value in c.values():
        if isinstance(value, torch.nn.Module):
            value.eval()
    return c


def _is_complete(directory: Path) -> bool:
    try:
        marker = json.loads((directory / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format_version") == TINY_FORMAT_VERSION


def write_tiny_model(directory: Path) -> Path:
    """Write the tiny model to `directory` atomically; a no-op if it is already complete."""
    from diffusers import FluxInpaintPipeline

    directory = Path(directory)
    if _is_complete(directory):
        log.info("tiny model already present at %s", directory)
        return directory
    if directory.is_dir() and any(directory.iterdir()):  # never clobber someone else's files
        raise FileExistsError(f"{directory} exists and is not a complete tiny model")
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp folder (same filesystem) and rename: readers never
    # see a half-written model, and concurrent writers cannot interleave files.
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the model folder should be readable by others
    try:
        log.info("building tiny FLUX.1 model (format v%d)", TINY_FORMAT_VERSION)
        parts = build_tiny_components()
        checker, processor = parts.pop("safety_checker"), parts.pop("feature_extractor")
        FluxInpaintPipeline(**parts).save_pretrained(tmp, safe_serialization=True)
        # Same layout as the hub repo CompVis/stable-diffusion-safety-checker.
        checker.save_pretrained(tmp / SAFETY_CHECKER_SUBFOLDER, safe_serialization=True)
        processor.save_pretrained(tmp / SAFETY_CHECKER_SUBFOLDER)
        (tmp / MARKER_NAME).write_text(json.dumps({"format_version": TINY_FORMAT_VERSION}) + "\n")
        try:
            os.rename(tmp, directory)  # also replaces an existing *empty* directory
        except OSError:
            if not _is_complete(directory):
                raise FileExistsError(f"{directory} exists and is not a complete tiny model") from None
            log.info("another process wrote %s first; discarding our copy", directory)
        else:
            log.info("wrote tiny model to %s", directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
    return directory


def ensure_tiny_model(cache_dir: Path) -> Path:
    """Return `cache_dir/tiny-flux-v<version>`, writing it first if it is missing."""
    return write_tiny_model(Path(cache_dir) / f"tiny-flux-v{TINY_FORMAT_VERSION}")


SINGLE_FILE_LAYOUTS = ("bfl", "comfy-fp8")


def write_transformer_file(model_dir: Path, file: Path, layout: str = "bfl") -> Path:
    """The tiny model's transformer (from ``model_dir``) as one ``.safetensors`` file, as FLUX.1-dev's
    transformer is published outside diffusers (FLUX_TRANSFORMER_FILE): ``bfl``, Black Forest Labs'
    original layout; ``comfy-fp8``, ComfyUI's: the same keys under ``model.diffusion_model.``, every
    matrix stored in float8 (e4m3fn), vectors as they are, as ``flux1-dev-fp8.safetensors`` is."""
    import torch
    from safetensors.torch import load_file, save_file

    from runners.pipeline.single_file import COMFY_PREFIX, diffusers_to_bfl

    if layout not in SINGLE_FILE_LAYOUTS:
        raise ValueError(f"layout {layout!r}: choose {', '.join(SINGLE_FILE_LAYOUTS)}")
    (weights,) = sorted((Path(model_dir) / "transformer").glob("*.safetensors"))
    state = diffusers_to_bfl(load_file(str(weights)))
    if layout == "comfy-fp8":
        state = {
            COMFY_PREFIX + key: tensor.to(torch.float8_e4m3fn) if tensor.dim() == 2 else tensor
            for key, tensor in state.items()
        }
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, file)
    return file


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m runners.pipeline.tiny",
        description="Write a tiny random-weight FLUX.1 inpainting model (diffusers layout) to DIR.",
    )
    parser.add_argument("directory", metavar="DIR", type=Path, help="folder to write the model into")
    parser.add_argument(
        "--transformer-file",
        metavar="FILE",
        type=Path,
        help="also write the transformer as one .safetensors file (for FLUX_TRANSFORMER_FILE)",
    )
    parser.add_argument(
        "--layout",
        choices=SINGLE_FILE_LAYOUTS,
        default="bfl",
        help="the transformer file's layout: bfl (Black Forest Labs' original) or comfy-fp8 (ComfyUI's float8)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(write_tiny_model(args.directory))
    if args.transformer_file is not None:
        print(write_transformer_file(args.directory, args.transformer_file, args.layout))


if __name__ == "__main__":
    main()
