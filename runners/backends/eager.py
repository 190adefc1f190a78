"""The eager-torch implementations of the backend interfaces: the diffusers modules themselves."""

from __future__ import annotations

import contextlib

from runners.backends.interfaces import FirstBlockOutput


class TorchTransformer:
    """Eager PyTorch FluxTransformer2DModel, or the same module compiled (regionally, its blocks in
    place, or whole: ``module`` is then torch.compile's wrapper). ``context``: entered around every
    call (the compiled backend's dynamo settings, which torch keeps per thread)."""

    def __init__(self, module, context=contextlib.nullcontext):
        self.module = module
        self.context = context
        self.in_channels = module.config.in_channels
        self.guidance_embeds = bool(module.config.guidance_embeds)

    def __call__(
        self, *, hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance, img_ids, txt_ids
    ):
        with self.context():
            return self.module(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                guidance=guidance,
                img_ids=img_ids,
                txt_ids=txt_ids,
                return_dict=False,
            )[0]

    @property
    def splittable(self) -> bool:
        # A torch.compile'd module runs as one graph: splitting it would run the blocks eager.
        return not hasattr(self.module, "_orig_mod")

    # The three parts below are FluxTransformer2DModel.forward (diffusers 0.42) cut after the first
    # block, op for op, so that running all three gives the same bits as the whole forward.
    def first_block(self, **inputs):
        with self.context():
            return self._first_block(**inputs)

    def _first_block(
        self, *, hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance, img_ids, txt_ids
    ):
        import torch

        module = self.module
        embedded = module.x_embedder(hidden_states)
        timestep = timestep.to(embedded.dtype) * 1000
        if guidance is None:
            temb = module.time_text_embed(timestep, pooled_projections)
        else:
            temb = module.time_text_embed(timestep, guidance.to(embedded.dtype) * 1000, pooled_projections)
        text = module.context_embedder(encoder_hidden_states)
        rotary = module.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        text, image = module.transformer_blocks[0](
            hidden_states=embedded,
            encoder_hidden_states=text,
            temb=temb,
            image_rotary_emb=rotary,
            joint_attention_kwargs=None,
        )
        return FirstBlockOutput(image, text, image - embedded, temb, rotary)

    def remaining_blocks(self, first, index=None):
        with self.context():
            return self._remaining_blocks(first, index)

    def _remaining_blocks(self, first, index):
        image, text, temb = first.hidden_states, first.encoder_hidden_states, first.temb
        if index is not None:
            image, text, temb = image[index], text[index], temb[index]
        module = self.module
        for block in [*module.transformer_blocks[1:], *module.single_transformer_blocks]:
            text, image = block(
                hidden_states=image,
                encoder_hidden_states=text,
                temb=temb,
                image_rotary_emb=first.rotary,
                joint_attention_kwargs=None,
            )
        return image

    def output(self, hidden_states, temb):
        with self.context():
            return self.module.proj_out(self.module.norm_out(hidden_states, temb))


class TorchVae:
    """Eager PyTorch AutoencoderKL."""

    def __init__(self, module, context=contextlib.nullcontext):
        self.module = module
        self.context = context
        config = module.config
        self.latent_channels = config.latent_channels
        self.scale_factor = 2 ** (len(config.block_out_channels) - 1)
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(config.shift_factor or 0.0)

    def encode(self, images):
        with self.context():
            return self.module.encode(images).latent_dist.parameters

    def decode(self, latents):
        with self.context():
            return self.module.decode(latents, return_dict=False)[0]
