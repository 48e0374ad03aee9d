"""Decision Transformer (Chen et al. 2021): offline RL as return-conditioned sequence modelling.

Each step t of a trajectory becomes three tokens (R̂_t, s_t, a_t): the return still to go, the state and
the action, each with its own linear embedding plus a learned embedding of the timestep t. A causal
GPT-2 (transformers' `DecisionTransformerModel`, not a copy) reads the interleaved tokens and predicts
a_t from the hidden state of the s_t token, so the prediction never sees a_t or anything later.
At evaluation the first R̂ is the return we ask for; it is decremented by every reward received.

    dtlab fit -c conf/dt.yaml                                   # the embedded Pendulum data
    dtlab fit -c conf/dt.yaml -c conf/halfcheetah/dt.yaml       # HalfCheetah medium, the paper's recipe
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import DecisionTransformerConfig, DecisionTransformerModel
from transformers.cache_utils import DynamicCache
from transformers.pytorch_utils import Conv1D

from dtlab.algos.base import OfflineRLModule
from dtlab.data.samplers import PAD_ACTION, BatchFormat, WindowBatch
from dtlab.networks import squashed_log_prob
from dtlab.policy import Normalizer
from dtlab.spec import DatasetSpec

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the Online DT's bounds on log σ


class DTPolicy(Normalizer):
    """The Decision Transformer as a plain nn.Module: raw context windows in, actions in the env's units out.

    Holds transformers' `DecisionTransformerModel` (GPT-2 backbone), the observation statistics and the
    action box; the return-to-go scale and the timestep range are its own. `DTAgent` turns it into an
    act-per-step policy; export and the Hub ship it.
    """

    def __init__(
        self,
        model: DecisionTransformerModel,
        spec: DatasetSpec,
        rtg_scale: float,
        max_ep_len: int,
        context_len: int,
        cache_keep: int,
        log_std_head: nn.Linear | None = None,
    ) -> None:
        super().__init__(spec)
        self.model, self.rtg_scale, self.max_ep_len = model, rtg_scale, max_ep_len
        self.log_std_head = log_std_head  # the Online DT's stochastic policy: log σ of the pre-tanh Gaussian
        self.obs_dim, self.act_dim = spec.observation_dim, spec.action_dim
        self.context_len, self.cache_keep = context_len, cache_keep  # acting: see DecisionTransformer's cache_keep

    def tokens(self, observations: torch.Tensor, actions: torch.Tensor, returns_to_go: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Raw steps (B, T, ...) -> (B, 3T, H) tokens interleaved R̂_1, s_1, a_1, R̂_2, ..., as in HF's forward."""
        m = self.model
        time = m.embed_timestep(timesteps.clamp(0, self.max_ep_len - 1))  # (B, T, H), added to all 3 tokens
        if self.discrete:
            action_in = F.one_hot(actions.long().clamp(min=0), self.act_dim).float()
        else:
            action_in = self.action_scaler.to_unit(actions)
        r = m.embed_return(returns_to_go * self.rtg_scale) + time
        s = m.embed_state(self.normalize(observations)) + time
        a = m.embed_action(action_in) + time
        return m.embed_ln(rearrange([r, s, a], "k b t h -> b (t k) h"))  # (B, 3T, H)

    def attention_mask(self, token_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) 1 on real tokens -> what GPT-2 attends with, no cache. Under SDPA a prepared (B, 1, L, L) boolean mask,
        causal over the real keys, which transformers uses as it is: given the (B, L) mask it checks on the host, at every
        forward, whether anything is padded (a device synchronisation). Each padding token attends to itself only, so no
        row is empty (finite outputs, masked out of every loss); real tokens attend to exactly what transformers' mask
        lets them. Eager attention takes the (B, L) mask."""
        if self.model.config._attn_implementation != "sdpa":
            return token_mask
        n = token_mask.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=token_mask.device).tril()
        itself = torch.eye(n, dtype=torch.bool, device=token_mask.device)
        return (causal & (token_mask.bool()[:, None, :] | itself))[:, None]  # (B, 1, L, L), True = attend

    def encode(self, tokens: torch.Tensor, token_mask: torch.Tensor, cache: DynamicCache | None = None) -> torch.Tensor:
        """GPT-2 over (B, L, H) tokens; `token_mask` (B, past+L) is 1 on real tokens (or, without a cache, a prepared
        `attention_mask`). With a cache, the new tokens attend to the cached ones too and their keys/values are appended to it."""
        out = self.model.encoder(
            inputs_embeds=tokens,
            attention_mask=token_mask,
            # All zeros, as in HF's DT forward: with a cache GPT-2 would otherwise number new tokens
            # past+0, past+1, ... and add position embeddings the model never saw in training.
            position_ids=torch.zeros(tokens.shape[:2], dtype=torch.long, device=tokens.device),
            cache=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    def action_head(self, state_hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states of s tokens -> actions in the box (continuous) or logits (discrete)."""
        out = self.model.predict_action(state_hidden)  # tanh'd when continuous
        return out if self.discrete else self.action_scaler(out)

    def distribution(self, state_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stochastic policy (Online DT): mean and log σ (clamped to [−5, 2], as ODT) of the pre-tanh
        Gaussian over unit-box actions. Its greedy action tanh(mean) is `action_head`'s."""
        mean = self.model.predict_action[0](state_hidden)  # predict_action = Linear, Tanh
        return mean, self.log_std_head(state_hidden).clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, state_hidden: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """An exploratory action of the stochastic policy in the box: tanh(mean + σ ε), ε ~ N(0, I) from `generator`."""
        mean, log_std = self.distribution(state_hidden)
        noise = torch.randn(mean.shape, generator=generator).to(mean)
        return self.action_scaler(torch.tanh(mean + log_std.exp() * noise))

    def state_hidden(
        self, observations: torch.Tensor, actions: torch.Tensor, returns_to_go: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, K, ...) windows -> (B, K, H): GPT-2's hidden states of the s_t tokens."""
        b, k = mask.shape
        tokens = self.tokens(observations, actions, returns_to_go, timesteps)  # (B, 3K, H)
        token_mask = mask.repeat_interleave(3, dim=1)  # (B, 3K), R̂/s/a of a step share its mask
        return self.encode(tokens, self.attention_mask(token_mask)).reshape(b, k, 3, -1)[:, :, 1]

    def forward(
        self, observations: torch.Tensor, actions: torch.Tensor, returns_to_go: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, K, ...) windows -> (B, K, act_dim): the prediction for a_t from the s_t token."""
        return self.action_head(self.state_hidden(observations, actions, returns_to_go, timesteps, mask))


class DecisionTransformer(OfflineRLModule):
    """Decision Transformer on transformers' GPT-2: (R̂, s, a) tokens, actions predicted from the state token.

    Continuous actions: tanh head scaled to the action box, masked MSE. Discrete actions: one-hot action
    input, logits head (no tanh), masked cross-entropy. Left padding (mask 0) never enters attention or
    the loss. Training batches are the DataModule's DT windows of `context_len` steps.

    Args:
        spec: dataset spec (linked from the DataModule by the CLI).
        context_len: K, steps per training window and the most the policy sees when acting.
        embed_dim: width of every token embedding and of GPT-2's residual stream.
        n_layer: GPT-2 blocks.
        n_head: attention heads per block (embed_dim must divide by it).
        dropout: dropout on embeddings, attention weights and residual branches.
        activation: GPT-2's MLP non-linearity ("relu" as in the DT paper's gym code, or "gelu_new").
        lr: AdamW peak learning rate, reached after the warm-up.
        weight_decay: AdamW decay on the weight matrices only (not biases, LayerNorms or embeddings).
        warmup_steps: updates of linear learning-rate warm-up from 0 to `lr`; constant afterwards.
        rtg_scale: returns-to-go are multiplied by this before embedding (1e-3 for MuJoCo returns in the 1000s).
        eval_targets: target returns evaluated in one validation pass; the first is the primary one, logged as
            `eval/normalized_score`. None: the expert reference return (ref_max_score, else the data's best
            return) first, then three targets spread from the data's worst return up to it.
        cache_keep: when acting, GPT-2's key/value cache lets every step feed only 3 new tokens; once the context
            holds K steps it restarts from its last `cache_keep` steps (re-encoded once), so the policy sees
            between cache_keep+1 and K steps. None: K // 2 (about 6 tokens per step on average). K - 1 is the
            paper's sliding window (every step re-encodes K - 1 steps: exact but no faster than no cache).
        max_ep_len: size of the timestep embedding (timesteps beyond are clipped). None: the data's longest episode.
        embedding_init: initialisation of the return/state/action embeddings and the action head. "torch":
            PyTorch's layer defaults, as in the authors' code and d3rlpy (the random biases keep a return's
            magnitude visible after embed_ln, which is scale-invariant); "gpt2": transformers' N(0, 0.02)
            with zero biases. The timestep embedding is N(0, 0.02) either way (as d3rlpy). Measured: docs/results.md.
        stochastic: the Online Decision Transformer's policy (Zheng, Zhang & Grover 2022; continuous actions): a
            tanh-squashed Gaussian whose mean is the deterministic head's, trained by the negative log-likelihood
            of the data's actions minus λ times the policy's entropy, with the temperature λ learned so that the
            entropy stays at least `target_entropy`. Acting greedily still takes tanh(mean).
        init_temperature: λ at the start (ODT: 0.1).
        target_entropy: the entropy floor; None: −act_dim (ODT).
        bf16: the training forward under bfloat16 autocast on a CUDA device that supports it (weights, optimiser and loss
            stay float32). None: on there; false: float32. Nothing changes on the CPU (the trainer's `precision` decides).
    """

    run_name = "dt"

    def __init__(
        self,
        spec: dict[str, Any] | None = None,
        context_len: int = 20,
        embed_dim: int = 128,
        n_layer: int = 3,
        n_head: int = 1,
        dropout: float = 0.1,
        activation: str = "relu",
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        warmup_steps: int = 10_000,
        rtg_scale: float = 0.001,
        eval_targets: Sequence[float] | None = None,
        cache_keep: int | None = None,
        max_ep_len: int | None = None,
        embedding_init: Literal["torch", "gpt2"] = "torch",
        stochastic: bool = False,
        init_temperature: float = 0.1,
        target_entropy: float | None = None,
        bf16: bool | None = None,
    ) -> None:
        super().__init__(spec)
        self.save_hyperparameters()
        if stochastic and self.spec.discrete:
            raise ValueError("stochastic (the Online DT's Gaussian policy) needs continuous actions; discrete DTs already model a distribution.")
        cache_keep = context_len // 2 if cache_keep is None else cache_keep
        if not 0 <= cache_keep < context_len:
            raise ValueError(f"cache_keep must be in [0, context_len) = [0, {context_len}), got {cache_keep}.")
        max_ep_len = max_ep_len or self.spec.max_episode_steps
        config = DecisionTransformerConfig(
            state_dim=self.obs_dim,
            act_dim=self.act_dim,  # discrete: the number of actions (one-hot in, logits out)
            hidden_size=embed_dim,
            n_layer=n_layer,
            n_head=n_head,
            n_inner=4 * embed_dim,
            activation_function=activation,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            max_ep_len=max_ep_len,
            action_tanh=not self.spec.discrete,
            n_positions=1,  # GPT-2's wpe only ever sees position 0: the timestep embedding replaces it
            vocab_size=1,
            bos_token_id=None,
            eos_token_id=None,
            attn_implementation="eager",  # accepted by every release; switched to SDPA below
        )
        model = DecisionTransformerModel(config)
        # Fused attention (torch's scaled_dot_product_attention). transformers 5.17 refuses attn_implementation="sdpa" for
        # DecisionTransformerModel (it lacks the class flag, 5.24 has it), yet its GPT-2 attention and causal mask read the
        # implementation from the config at every forward on both: setting it there gives SDPA on either release.
        model.config._attn_implementation = "sdpa"
        # Parts of the HF model DT never uses (token ids, next-state/return heads): frozen, so DDP
        # does not wait for their gradients and AdamW leaves them alone.
        for unused in (model.encoder.wte, model.predict_state, model.predict_return):
            unused.requires_grad_(False)
        log_std_head = nn.Linear(embed_dim, self.act_dim) if stochastic else None
        self.policy = DTPolicy(model, self.spec, rtg_scale, max_ep_len, context_len, cache_keep, log_std_head)
        self.init_embeddings(embedding_init)
        if stochastic:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))
            self.target_entropy = -float(self.act_dim) if target_entropy is None else target_entropy

    @property
    def model(self) -> DecisionTransformerModel:
        """transformers' DecisionTransformerModel inside the policy."""
        return self.policy.model

    @property
    def batch_format(self) -> BatchFormat:
        return BatchFormat("windows", context_len=self.hparams.context_len)

    def forward(
        self, observations: torch.Tensor, actions: torch.Tensor, returns_to_go: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return self.policy(observations, actions, returns_to_go, timesteps, mask)

    def init_embeddings(self, scheme: str) -> None:
        """Re-initialise the DT layers that transformers' post_init set to N(0, 0.02) (see embedding_init)."""
        if scheme not in ("torch", "gpt2"):
            raise ValueError(f"embedding_init must be 'torch' or 'gpt2', got {scheme!r}.")
        if scheme == "torch":
            m = self.model
            for layer in (m.embed_return, m.embed_state, m.embed_action, m.predict_action[0]):
                layer.reset_parameters()

    def masked_mean(self, per_step: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over real steps. The sum is divided by the mean count of real steps per process, so under DDP
        (where gradients are averaged over processes) the gradient is the global batch's masked mean's."""
        return (per_step * mask).sum() / self.mean_over_processes(mask.sum()).clamp(min=1)

    def dt_loss(self, batch: WindowBatch) -> torch.Tensor:
        """Masked MSE (continuous, in the action box's units) or cross-entropy (discrete) over real steps."""
        preds = self.policy(batch.observations, batch.actions, batch.returns_to_go, batch.timesteps, batch.mask)
        mask = batch.mask.float()
        if self.spec.discrete:
            per_step = F.cross_entropy(preds.flatten(0, 1), batch.actions.flatten(), reduction="none").view_as(mask)
        else:
            per_step = ((preds - batch.actions) ** 2).mean(-1)
        return self.masked_mean(per_step, mask)

    def odt_loss(self, batch: WindowBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The Online DT's objective over real steps (Zheng et al. 2022, eq. 4 and its dual):

            L_π = −E[log π(a | ·)] − λ H[π],     L_λ = λ (H[π] − β)  (H detached),

        with a the data's unit-box action, H estimated by −log π of one reparameterised sample per step,
        λ = exp(log_temperature) (detached in L_π) and β the target entropy. Returns (L_π + L_λ, metrics)."""
        hidden = self.policy.state_hidden(batch.observations, batch.actions, batch.returns_to_go, batch.timesteps, batch.mask)
        mean, log_std = self.policy.distribution(hidden)  # (B, K, A)
        mask = batch.mask.float()
        unit = self.policy.action_scaler.to_unit(batch.actions).clamp(-1 + 1e-6, 1 - 1e-6)
        log_likelihood = self.masked_mean(squashed_log_prob(torch.atanh(unit), mean, log_std), mask)
        u = mean + torch.randn_like(mean) * log_std.exp()
        entropy = -self.masked_mean(squashed_log_prob(u, mean, log_std), mask)
        temperature = self.log_temperature.exp()
        policy_loss = -(log_likelihood + temperature.detach() * entropy)
        temperature_loss = temperature * (entropy - self.target_entropy).detach()
        metrics = {"log_likelihood": log_likelihood.detach(), "entropy": entropy.detach(), "temperature": temperature.detach()}
        return policy_loss + temperature_loss, metrics

    def autocast(self) -> torch.autocast:
        """bfloat16 autocast of the training forward on a CUDA device that supports it, unless `bf16` is false."""
        on = self.device.type == "cuda" and self.hparams.bf16 is not False and torch.cuda.is_bf16_supported()
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on)

    def training_step(self, batch: WindowBatch, batch_idx: int) -> torch.Tensor:
        with self.autocast():
            loss, metrics = self.odt_loss(batch) if self.hparams.stochastic else (self.dt_loss(batch), {})
        if metrics:
            self.log_dict({f"train/{k}": v for k, v in metrics.items()}, sync_dist=True)
        self.log("train/dt_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        # Decay weight matrices (Linear/Conv1D) only; biases, LayerNorms and embeddings stay undecayed.
        # The Online DT's temperature is its own group: no decay, no warm-up (ODT steps it with a separate Adam).
        decay, no_decay = [], []
        for module in self.policy.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    (decay if name == "weight" and isinstance(module, (nn.Linear, Conv1D)) else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        warmup = max(1, self.hparams.warmup_steps)
        schedules = [lambda step: min(1.0, (step + 1) / warmup)] * 2
        if self.hparams.stochastic:
            groups.append({"params": [self.log_temperature], "weight_decay": 0.0})
            schedules.append(lambda step: 1.0)
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, fused=True)  # one kernel for every tensor
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- acting and evaluation ---------------------------------------------------------------------

    @property
    def eval_targets(self) -> list[float]:
        """Target returns of an evaluation, the primary one first (see the `eval_targets` argument)."""
        targets = self.hparams.eval_targets
        return [float(t) for t in targets] if targets else default_targets(self.spec)

    def make_agent(
        self,
        num_envs: int,
        target_returns: Sequence[float] | float | None = None,
        use_cache: bool = True,
        next_step_autoreset: bool = True,
        deterministic: bool = True,
        generator: torch.Generator | None = None,
    ) -> DTAgent:
        """The policy over `num_envs` envs, each conditioned on its target return (default: the primary
        eval target). Call `.eval()` first outside training, or dropout stays on.
        `next_step_autoreset`: the envs reset on the step after an episode ends (gymnasium's default).
        `deterministic=False` samples the stochastic policy's actions (noise drawn from `generator`)."""
        if target_returns is None:
            target_returns = self.eval_targets[0]
        if not deterministic and not self.hparams.stochastic:
            raise ValueError("Only a stochastic DT (--model.init_args.stochastic true) samples exploratory actions.")
        targets = np.broadcast_to(np.asarray(target_returns, dtype=np.float64), (num_envs,))
        return DTAgent(self.policy, targets, use_cache, next_step_autoreset, deterministic, generator)


def default_targets(spec) -> list[float]:
    """The expert's return (or the data's best) first, then three from the data's worst return up to it."""
    top = spec.ref_max_score if spec.ref_max_score is not None else spec.return_max
    low = spec.return_min
    return [float(top)] + [float(low + (top - low) * f) for f in (0.0, 1 / 3, 2 / 3)]


class DTAgent:
    """A Decision Transformer as an act-per-step policy over N environments (the Agent protocol).

    Per env it keeps the current episode's context (the last steps' raw observations, actions,
    returns-to-go and timesteps, left-padded to K, newest at K-1), the return still to go (raw
    units, decremented by every reward) and the timestep; all three start over with each episode.

    With `use_cache` GPT-2's keys/values of the context are kept, so a step feeds 3 new tokens
    (a_{t-1}, R̂_t, s_t). The batched cache holds (N, heads, L, d) per layer with a (N, L) mask,
    newest tokens right-aligned; an env whose context is full restarts from its last `cache_keep`
    steps, re-encoded alone and written over the right end of its row. Without the cache the same
    context is re-encoded every step: the reference the cached path must reproduce.
    `deterministic=False` samples the stochastic policy's actions (the Online DT's exploration).
    """

    def __init__(
        self,
        policy: DTPolicy,
        target_returns: np.ndarray,
        use_cache: bool = True,
        next_step_autoreset: bool = True,
        deterministic: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        self.model, self.use_cache, self.next_step_autoreset = policy, use_cache, next_step_autoreset
        self.deterministic, self.generator = deterministic, generator
        self.targets = np.asarray(target_returns, dtype=np.float64)
        n, k, dev = len(self.targets), policy.context_len, policy.obs_mean.device
        self.n, self.k, self.device = n, k, dev
        self.observations = torch.zeros(n, k, policy.obs_dim, device=dev)
        if policy.discrete:
            self.actions = torch.zeros(n, k, dtype=torch.long, device=dev)
        else:
            self.actions = torch.full((n, k, policy.act_dim), PAD_ACTION, device=dev)
        self.returns_to_go_ctx = torch.zeros(n, k, 1, device=dev)
        self.timesteps_ctx = torch.zeros(n, k, dtype=torch.long, device=dev)
        self.length = np.zeros(n, dtype=np.int64)  # steps in each env's context
        self.returns_to_go = self.targets.copy()  # raw return still to go
        self.timestep = np.zeros(n, dtype=np.int64)
        self.resetting = np.zeros(n, dtype=bool)  # the env's next step is its auto-reset step
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (N, heads, L, d)
        self.kv_mask = torch.zeros(n, 0, dtype=torch.long, device=dev)

    def _push(self, observations: torch.Tensor) -> np.ndarray:
        """Shift every context left by one step and write the new step at K-1; returns which envs
        restarted a full context (they keep their last cache_keep steps)."""
        full = self.length >= self.k
        self.length[full] = self.model.cache_keep
        for buf in (self.observations, self.actions, self.returns_to_go_ctx, self.timesteps_ctx):
            buf.copy_(torch.roll(buf, -1, dims=1))
        self.observations[:, -1] = observations
        self.actions[:, -1] = 0 if self.model.discrete else PAD_ACTION  # a_t is unknown yet (and unseen by s_t)
        self.returns_to_go_ctx[:, -1, 0] = torch.as_tensor(self.returns_to_go, dtype=torch.float32, device=self.device)
        self.timesteps_ctx[:, -1] = torch.as_tensor(self.timestep, device=self.device)
        self.length += 1
        return full

    def _step_mask(self) -> torch.Tensor:
        """(N, K) 1 on the steps of each env's context."""
        start = torch.as_tensor(self.k - self.length, device=self.device)
        return (torch.arange(self.k, device=self.device)[None] >= start[:, None]).long()

    @torch.no_grad()
    def act(self, observations: np.ndarray) -> np.ndarray:
        obs = torch.as_tensor(observations, dtype=torch.float32, device=self.device)
        restarted = self._push(obs)
        m = self.model
        if not self.use_cache or self.k < 2:  # K = 1: every step is a fresh context, nothing to cache
            hidden = m.state_hidden(self.observations, self.actions, self.returns_to_go_ctx, self.timesteps_ctx, self._step_mask())[:, -1]
        else:
            hidden = self._act_cached(restarted)
        preds = m.action_head(hidden) if self.deterministic else m.sample(hidden, self.generator)
        actions = preds.argmax(-1) if m.discrete else preds.float()  # float: bf16 under autocast
        self.actions[:, -1] = actions
        return actions.cpu().numpy()

    def _act_cached(self, restarted: np.ndarray) -> torch.Tensor:
        """The newest s token's hidden state (N, H), feeding GPT-2 only the new tokens."""
        m, k = self.model, self.k
        # Re-encode the kept steps of restarted contexts: R̂, s, a of each but the newest step's a,
        # which comes with the new tokens below. (Steps K-1-keep .. K-2 after the shift.)
        if self.kv is not None and restarted.any():
            keep = m.cache_keep
            rows = torch.as_tensor(np.flatnonzero(restarted), device=self.device)
            span = slice(k - 1 - keep, k - 1)
            if keep > 0:
                kept = m.tokens(self.observations[rows, span], self.actions[rows, span], self.returns_to_go_ctx[rows, span], self.timesteps_ctx[rows, span])
                kept = kept[:, :-1]  # (R, 3·keep - 1, H)
                cache = DynamicCache()
                m.encode(kept, torch.ones(kept.shape[:2], dtype=torch.long, device=self.device), cache)
                width = kept.shape[1]
                for layer, (key, value) in enumerate(self.kv):
                    key[rows, :, -width:] = cache.layers[layer].keys
                    value[rows, :, -width:] = cache.layers[layer].values
            self.kv_mask[rows] = 0
            if keep > 0:
                self.kv_mask[rows, -width:] = 1
        # New tokens: a_{t-1} (masked at a context's first step), R̂_t, s_t.
        steps = slice(k - 2, k)
        new = m.tokens(self.observations[:, steps], self.actions[:, steps], self.returns_to_go_ctx[:, steps], self.timesteps_ctx[:, steps])[:, 2:5]
        first = torch.as_tensor(self.length == 1, device=self.device)
        new_mask = torch.ones(self.n, 3, dtype=torch.long, device=self.device)
        new_mask[:, 0] = (~first).long()
        cache = DynamicCache()
        if self.kv is not None:
            for layer, (key, value) in enumerate(self.kv):
                cache.update(key, value, layer)
        mask = torch.cat([self.kv_mask, new_mask], dim=1)
        hidden = m.encode(new, mask, cache)  # (N, 3, H)
        # Keep the cache, dropping leading columns no env attends to any more.
        live = int(mask.any(0).long().argmax())
        self.kv = [(layer.keys[:, :, live:], layer.values[:, :, live:]) for layer in cache.layers]
        self.kv_mask = mask[:, live:]
        return hidden[:, 2]

    def observe(self, rewards: np.ndarray, dones: np.ndarray) -> None:
        self.returns_to_go = self.returns_to_go - rewards
        self.timestep += 1
        dones = np.asarray(dones, dtype=bool)
        # gymnasium's vector envs auto-reset by default on the step after an episode ends (NEXT_STEP):
        # that step's action is ignored and it returns the new episode's first observation. So an env
        # starts over both at its end and once more after that step.
        start_over = dones | self.resetting
        self.resetting = dones & self.next_step_autoreset
        if start_over.any():  # empty context, full target
            self.returns_to_go[start_over] = self.targets[start_over]
            self.timestep[start_over] = 0
            self.length[start_over] = 0
            if self.kv is not None:
                self.kv_mask[torch.as_tensor(start_over, device=self.device)] = 0
