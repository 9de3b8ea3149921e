"""MDT: one policy that follows a language instruction *or* a goal image.

The network is the DiT baseline's (non-causal encoder over condition tokens; decoder over noisy action tokens:
self-attention → cross-attention to the encoder → MLP, noise level through AdaLN-Zero), with a goal token in
front of the observation tokens instead of a task id. Language goals are frozen sentence embeddings
(`goal.lang_emb`, cached in the store); image goals are a frame 20–50 steps ahead in the same episode, encoded
by the observation encoder's own camera networks. Every sample trains with its image goal; the few samples with
an instruction train with their language goal too, and two auxiliary losses shape the encoder: Masked
Generative Foresight and Contrastive Latent Alignment (robodit/policies/mdt/foresight.py). CLA contrasts the goal
token's encoding under the language vs the image goal of one sample, against the other labelled samples' goals
placed in the same observation, so the observation cannot give the answer away.

Goal dropout replaces the image-goal token by a learned null token with probability `goal_dropout`, so the
policy also acts sensibly with no goal. Shapes: one goal token [B, 1, D] whatever the modality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from robodit.datasets.normalizer import Normalizer
from robodit.keys import is_image_key
from robodit.policies.base import keep_in_graph, register_policy
from robodit.policies.dit.modeling import DiTPolicy
from robodit.policies.mdt.foresight import ContrastiveAlignment, MaskedForesight

SIZES = {
    # name: (width, decoder depth, heads, encoder depth, image channels)
    "tiny": (64, 2, 2, 1, (8, 16, 32, 32)),
    "small": (128, 4, 4, 2, (16, 32, 64, 128)),  # CPU benchmark size
    "base": (256, 4, 4, 2, (32, 64, 128, 256)),
    "paper": (512, 6, 8, 4, (64, 128, 256, 512)),  # MDT's width and depths
}
GOAL_MODALITIES = ("language", "image")


@register_policy("mdt")
class MDTPolicy(DiTPolicy):
    SIZES = SIZES
    task_goals, language_goals = False, True  # the goal token stands where a task id would
    default_formulation = {"name": "edm"}  # the paper's EDM (sigma_data 0.5, log-logistic training sigmas)

    def __init__(self, shape_meta: dict, normalizer: Normalizer | None = None, size: str = "base",
                 obs_horizon: int = 1, action_horizon: int = 10, n_action_steps: int = 10,
                 formulation: dict | None = None, sampler: str = "ddim", num_inference_steps: int = 10,
                 width: int | None = None, depth: int | None = None, heads: int | None = None,
                 dropout: float = 0.0, noise_cond_scale: float | None = None,
                 language_encoder: str = "minilm", lang_dim: int = 384, goal_offsets=(20, 50),
                 goal_dropout: float = 0.1, goal_modality: str = "language",
                 future_frames: int = 1, future_stride: int = 3,
                 mgf_weight: float = 1.0, mgf_patch: int = 8, mgf_mask_ratio: float = 0.75, mgf_width: int = 128,
                 mgf_depth: int = 2, mgf_batch: int = 0, cla_weight: float = 1.0, cla_temperature: float = 0.07,
                 image_pooling: str = "avg", image_stem_stride: int = 1):
        super().__init__(shape_meta, normalizer, size, obs_horizon, action_horizon, n_action_steps,
                         formulation, sampler, num_inference_steps, width, depth, heads,
                         dropout, noise_cond_scale, image_pooling=image_pooling, image_stem_stride=image_stem_stride)
        self.task_embedding = None  # goal-conditioned: the goal token stands where the task id would
        w = self.action_in.out_features
        self.image_keys = sorted(k for k, (s, d) in self.obs_shapes.items() if is_image_key(s, d))
        self.image_goals = tuple(self.image_keys)  # a goal image per camera
        if not self.image_keys:
            raise ValueError("mdt needs at least one camera (uint8 H×W×C observation): goal images and foresight "
                             f"are images; the store's observation keys are {sorted(self.obs_shapes)}")
        if goal_modality not in GOAL_MODALITIES:
            raise ValueError(f"goal_modality must be one of {GOAL_MODALITIES}, got {goal_modality!r}")
        if not 0.0 <= goal_dropout < 1.0:
            raise ValueError(f"goal_dropout must be in [0, 1), got {goal_dropout}")
        if mgf_weight > 0 and future_frames < 1:
            raise ValueError("mgf_weight > 0 needs future_frames >= 1 (the frame MGF reconstructs)")
        if not (isinstance(mgf_batch, int) and mgf_batch >= 0):
            raise ValueError(f"mgf_batch must be an int >= 0 (0: the whole batch), got {mgf_batch!r}")
        self.language_encoder, self.lang_dim = language_encoder, int(lang_dim)
        self.goal_offsets, self.goal_dropout, self.goal_modality = tuple(goal_offsets), goal_dropout, goal_modality
        self.future_frames, self.future_stride = future_frames, future_stride
        self.mgf_weight, self.cla_weight, self.mgf_batch = float(mgf_weight), float(cla_weight), mgf_batch
        self.lang_goal = nn.Sequential(nn.Linear(self.lang_dim, w), nn.SiLU(), nn.Linear(w, w))
        self.image_goal = nn.Sequential(nn.Linear(w * len(self.image_keys), w), nn.SiLU(), nn.Linear(w, w))
        self.null_goal = nn.Parameter(torch.zeros(w))
        self.goal_pos = nn.Parameter(torch.randn(w) * 0.02)
        size_px, _, channels = self.obs_shapes[self.image_keys[0]][0]
        self.foresight = (MaskedForesight(self.image_keys, size_px, channels, w, patch=mgf_patch, width=mgf_width,
                                          depth=mgf_depth, heads=max(1, mgf_width // 32), mask_ratio=mgf_mask_ratio)
                          if mgf_weight > 0 else None)
        self.alignment = ContrastiveAlignment(w, cla_temperature) if cla_weight > 0 else None

    # -- goals ------------------------------------------------------------------------------------------------
    def image_goal_token(self, goal: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [k for k in self.image_keys if k not in goal]
        if missing:
            raise KeyError(f"image goal is missing camera(s) {missing}; expected goal images {self.image_keys}")
        feats = [self.obs_encoder.encoders[k](goal[k]) for k in self.image_keys]
        return self.image_goal(torch.cat(feats, dim=-1))

    def language_goal_token(self, lang_emb: torch.Tensor) -> torch.Tensor:
        return self.lang_goal(lang_emb.to(self.null_goal.dtype))

    def encode_tokens(self, goal_token: torch.Tensor, obs_tokens: torch.Tensor) -> torch.Tensor:
        """The non-causal encoder over [goal, observation tokens] → [B, 1 + N, D]."""
        tokens = torch.cat([(goal_token + self.goal_pos)[:, None], obs_tokens], dim=1)
        for block in self.context_encoder:
            tokens = block(tokens)
        return tokens

    def goal_keys(self) -> list[str]:
        return super().goal_keys() + ["no_goal"]  # the learned null token (what goal dropout trains)

    def _inference_goal(self, goal: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
        """The goal token from a resolved goal (`resolve_goal`): language or image under `goal_modality`."""
        has_image = all(k in goal for k in self.image_keys)
        if "lang_emb" in goal and (self.goal_modality == "language" or not has_image):
            return self.language_goal_token(goal["lang_emb"])
        if has_image:
            return self.image_goal_token(goal)
        if goal.get("no_goal") is not None:
            return self.null_goal.expand(batch, -1)
        raise ValueError(f"mdt needs a goal: goal={{'instruction': str}}, {{'lang_emb': [B, {self.lang_dim}]}} or goal "
                         f"images {{{', '.join(repr(k) for k in self.image_keys)}: [B, H, W, C] uint8}}; got keys "
                         f"{sorted(goal)}")

    def encode(self, obs, goal):
        obs_tokens = self.obs_encoder(obs)
        tokens = self.encode_tokens(self._inference_goal(goal or {}, obs_tokens.shape[0]), obs_tokens)
        if self.training:
            return {"tokens": tokens, "kv": [None] * len(self.blocks)}
        return {"tokens": tokens, "kv": [block.cross.keys_values(tokens) for block in self.blocks]}

    def goal_for_task(self, task: str, instruction: str | None = None, goal_image: str | None = None) -> dict:
        """The evaluator's goal for `task` under `goal_modality` (see robodit/evaluation/evaluate.py)."""
        if self.goal_modality == "language":
            if not instruction:
                raise ValueError(f"task {task!r} has no instruction for a language goal")
            return {"lang_emb": self.embed_instructions([instruction])[0]}
        if goal_image is None:
            raise ValueError(f"task {task!r} has no goal image (goal=image makes one from a held-out expert success)")
        return load_goal_image(goal_image, {k: self.obs_shapes[k][0] for k in self.image_keys})

    # -- training ---------------------------------------------------------------------------------------------
    def _dropout(self, token: torch.Tensor) -> torch.Tensor:
        if not self.training or self.goal_dropout <= 0:
            return token
        drop = torch.rand(token.shape[0], device=token.device) < self.goal_dropout
        return torch.where(drop[:, None], self.null_goal.to(token.dtype), token)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        obs = self.normalize_obs(self.split_batch(batch, "obs"))
        obs_tokens = self.obs_encoder(obs)
        b = obs_tokens.shape[0]
        goal = self.resolve_goal(self.goal_from_batch(batch), b)
        x0, mask = self.diffusion_target(batch)
        image_token = self.image_goal_token(goal)
        enc_image = self.encode_tokens(self._dropout(image_token), obs_tokens)
        losses = [self._diffusion(enc_image, x0, mask)]
        has_lang = goal.get("has_lang", torch.zeros(b, dtype=torch.bool, device=obs_tokens.device)).bool()
        idx = has_lang.nonzero().flatten()
        out: dict[str, torch.Tensor] = {}
        lang_token = None
        if len(idx):
            lang_token = self.language_goal_token(goal["lang_emb"][idx])
            enc_lang = self.encode_tokens(lang_token, obs_tokens[idx])
            losses.append(self._diffusion(enc_lang, x0[idx], mask[idx]))
        per_sample = torch.cat(losses)
        diffusion = per_sample.mean()
        loss = keep_in_graph(diffusion, self.lang_goal.parameters())  # batches without language too (DDP)
        out["diffusion_loss"] = diffusion.detach()
        out["language_fraction"] = has_lang.float().mean().detach()
        if self.foresight is not None:  # on the first mgf_batch samples (a random subset: batches are shuffled)
            n = self.mgf_batch or b
            targets = {k: batch[f"future.{k}"][:n, 0] for k in self.image_keys}
            mgf, _, _ = self.foresight(enc_image[:n], targets)
            loss = loss + self.mgf_weight * mgf
            out["mgf_loss"] = mgf.detach()
        if self.alignment is not None:
            if len(idx) >= 2:
                cla = self.alignment_loss(obs_tokens[idx], image_token[idx], lang_token, goal["lang_emb"][idx],
                                          batch["task_id"][idx] if "task_id" in batch else None)
            else:  # a contrast needs two samples
                cla = keep_in_graph(diffusion.new_zeros(()), self.alignment.parameters())
            loss = loss + self.cla_weight * cla
            out["cla_loss"] = cla.detach()
            out["cla_temperature"] = self.alignment.logit_scale.detach().neg().exp()
        out["loss"] = loss
        return out

    def alignment_loss(self, obs_tokens: torch.Tensor, image_goals: torch.Tensor, lang_goals: torch.Tensor,
                       lang_emb: torch.Tensor, task_id: torch.Tensor | None = None) -> torch.Tensor:
        """CLA over K labelled samples: observation tokens [K, N, D], their image- and language-goal tokens [K, D],
        the instruction embeddings [K, lang_dim] and task ids [K] (which pairs name the same goal). Draws no
        randomness, so switching it off changes nothing else in training."""
        same = self._same_goal(lang_emb, task_id)
        return self.alignment(self._goal_grid(lang_goals, obs_tokens), self._goal_grid(image_goals, obs_tokens), same)

    def _goal_grid(self, goal_tokens: torch.Tensor, obs_tokens: torch.Tensor) -> torch.Tensor:
        """The encoder's goal-token output for every (observation i, goal j) pair: [K, K, D] from goal tokens
        [K, D] and observation tokens [K, N, D]. CLA's candidates for anchor i are row i: one observation, K goals."""
        k, n, d = obs_tokens.shape
        goals = goal_tokens[None].expand(k, k, d).reshape(k * k, d)
        obs = obs_tokens[:, None].expand(k, k, n, d).reshape(k * k, n, d)
        return self.encode_tokens(goals, obs)[:, 0].reshape(k, k, d)

    @staticmethod
    def _same_goal(lang_emb: torch.Tensor, task_id: torch.Tensor | None) -> torch.Tensor:
        """[K, K] bool: samples i and j name the same goal (the same instruction, or the same task: a paraphrase
        of one task's instruction is no negative for it)."""
        same = (lang_emb[:, None] == lang_emb[None]).all(-1)
        if task_id is not None:
            same = same | (task_id[:, None] == task_id[None])
        return same

    def _diffusion(self, encoded: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        cond = {"tokens": encoded, "kv": [None] * len(self.blocks)}
        return self.formulation.loss(lambda x, c: self.denoise(x, c, cond), x0, mask=mask)

    # -- foresight pictures -----------------------------------------------------------------------------------
    @torch.no_grad()
    def foresight_examples(self, batch: dict[str, torch.Tensor], seed: int = 0) -> dict:
        """MGF reconstructions of the frames `future_stride` steps ahead for a batch of windows (image goals)."""
        if self.foresight is None:
            raise ValueError("this MDT was trained without MGF (mgf_weight=0): nothing to reconstruct")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        obs = self.normalize_obs(self.split_batch(batch, "obs"))
        goal = self.resolve_goal(self.goal_from_batch(batch), batch["action"].shape[0])
        enc = self.encode_tokens(self.image_goal_token(goal), self.obs_encoder(obs))
        targets = {k: batch[f"future.{k}"][:, 0] for k in self.image_keys}
        gen = torch.Generator(device=self.device).manual_seed(seed)
        loss, pred, mask = self.foresight(enc, targets, generator=gen)
        current = {k: self.foresight.to_float(batch[f"obs.{k}"][:, -1]) for k in self.image_keys}
        return {"loss": float(loss), "current": current, "views": self.foresight.compose(pred, targets, mask)}

    def write_foresight_grid(self, store_path: str | Path, out_path: str | Path, n: int = 4, seed: int = 0) -> Path:
        """A PNG: per row one demonstration window; per camera: current frame, masked future, MGF's
        reconstruction, real future frame."""
        import imageio.v3 as iio

        from robodit.datasets.sampler import WindowConfig, WindowDataset

        cfg = WindowConfig(obs_horizon=self.obs_horizon, action_horizon=self.action_horizon,
                           obs_keys=tuple(sorted(self.obs_shapes)), future_frames=self.future_frames,
                           future_stride=self.future_stride, goal_offsets=self.goal_offsets,
                           cache=False)  # a few windows: stream their images, don't load the whole store
        data = WindowDataset(store_path, cfg, train=False)
        picks = np.linspace(0, len(data) - 1, n).astype(int)
        items = [data[int(i)] for i in picks]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        ex = self.foresight_examples(batch, seed)
        rows = []
        for r in range(n):
            cells = []
            for k in self.image_keys:
                cells += [ex["current"][k][r], *(v[r] for v in ex["views"][k])]
            row = torch.cat([c.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0) for c in cells], dim=1)
            rows.append(row)
        grid = torch.cat(rows, dim=0).cpu().numpy()
        grid = grid.repeat(2, axis=0).repeat(2, axis=1)  # 64 px frames are hard to see at 1:1
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(out_path, grid)
        return out_path


def load_goal_image(path: str | Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Goal images from a file: `.npz` with one HWC uint8 array per camera key, or an image file (one camera)."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            images = {k: data[k] for k in data.files}
    else:
        import imageio.v3 as iio

        if len(shapes) != 1:
            raise ValueError(f"{path}: one image file, but the policy has cameras {sorted(shapes)}; give an .npz "
                             "with one array per camera")
        images = {next(iter(shapes)): np.asarray(iio.imread(path))[..., :3]}
    out = {}
    for key, shape in shapes.items():
        if key not in images:
            raise KeyError(f"{path}: no goal image for camera {key!r} (it has {sorted(images)})")
        img = np.asarray(images[key])
        if tuple(img.shape) != tuple(shape) or img.dtype != np.uint8:
            raise ValueError(f"{path}: goal image {key!r} is {img.dtype} {tuple(img.shape)}; expected uint8 "
                             f"{tuple(shape)}")
        out[key] = img
    return out
