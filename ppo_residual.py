"""Residual PPO: an on-policy RL policy learns a bounded correction on top of a frozen base policy (ResiP's recipe).

    a_t = clip(a_base + scale * tanh(u)),  u ~ N(mu([s_t, a_base]), sigma),  a_base = M_phi(v_theta(s_t, c))  (eq. 1)

The residual's mean head starts at exactly zero, so the untrained policy is the base; exploration is a small Gaussian
(optionally fixed) around it. Observations and rewards are normalised (statistics saved in checkpoints), GAE
bootstraps through time-limit truncations but not through terminations, envs reset partially. Value clipping and
target-KL early stopping are flags. Resume is exact: checkpoints are taken where every env restarts from a seed
derived from the step.

    python ppo_residual.py                                      # CPU, 2 envs, the offline `coarse` base
    python ppo_residual.py --num-envs 512 --num-steps 50        # GPU
    python ppo_residual.py --evaluate --checkpoint runs/<run>/ckpt.pt

Logged: train/{return,episode_len,success_once,success_at_end}, eval/{same}, eval_base/{same} (the base alone,
measured once, repeated at every eval), reward/{grasp,orient,insert,success,stage}, losses/{value_loss,policy_loss,
entropy,old_approx_kl,approx_kl,clipfrac,explained_variance}, residual/{base_action_norm,residual_action_norm,std},
charts/{SPS,env_SPS,SPS_over_env_SPS,learning_rate}, time/{rollout,env,update,eval}.
"""

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import tyro

import common


@dataclass
class Args:
    # experiment
    exp_name: str = "ppo_residual"
    """the name of this experiment (runs/<exp_name>__<seed>__<time>)"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """whether to set torch.backends.cudnn.deterministic"""
    cuda: bool = True
    """whether to use CUDA when available"""
    capture_video: bool = False
    """whether to save eval videos under runs/<run>/videos"""
    save_model: bool = True
    """whether to save a checkpoint at every evaluation and at the end"""
    evaluate: bool = False
    """whether to only evaluate --checkpoint and exit"""
    checkpoint: Optional[str] = None
    """checkpoint to resume from (or to evaluate with --evaluate)"""
    save_trajectories: Optional[str] = None
    """with --evaluate: folder for the successful episodes in ManiSkill's trajectory format (the data flywheel)"""

    # environment
    env_id: str = common.ENV_ID
    """the ManiSkill task"""
    num_envs: int = 2
    """parallel training envs (CPU: one process each; GPU: e.g. 512)"""
    num_eval_envs: int = 2
    """parallel eval envs"""
    num_eval_episodes: int = 100
    """episodes per evaluation (ManiSkill's protocol: full length, reconfigured)"""
    eval_freq: int = 50_000
    """evaluate (and checkpoint) every this many env steps (at the end of the iteration that crosses it)"""
    control_mode: str = "pd_ee_delta_pose"
    """the controller; the scripted bases need pd_ee_delta_pose"""
    sim_backend: str = "auto"
    """auto (GPU if CUDA is there), physx_cuda or physx_cpu"""
    reward: str = "staged"
    """staged (paper section 2.3), normalized_dense (ManiSkill's) or sparse"""
    reward_lateral: float = 0.0
    """with the staged reward (ignored by the others): weight of a term for the peg head's lateral distance from the
    hole axis while inserting (per metre, clipped at 2 cm; common.StagedRewardConfig.d3). 0 is the paper's reward, where
    4 mm of aim error costs 0.004 per step"""
    total_timesteps: int = 500_000
    """total env steps"""
    max_episode_steps: Optional[int] = None
    """episode length of the training and eval envs (None: the task's, 100 steps for PegInsertionSide-v1);
    shorter only for quick runs and tests: success_at_end is defined at the task's limit"""

    # base policy and residual
    base: str = "coarse"
    """the frozen base: pi0:<hub id or folder>, expert, coarse[:key=value,...] or zero"""
    residual_scale: float = 0.1
    """bound of the residual in action units: a = clip(a_base + scale * tanh(u)) (ResiP, Policy Decorator)"""
    residual_sees_base: bool = True
    """whether the residual observes [s, a_base] (paper 2.1) rather than s alone"""
    task_features: bool = True
    """whether the residual also observes common.task_features(s): the head's offset from the hole axis, depth, tilt"""
    residual_dims: Optional[tuple[int, ...]] = None
    """the action dimensions the residual may change (None: all); e.g. `0 1 2`, the translation of pd_ee_delta_pose,
    where the coarse base's error is (a hand-written lateral correction on those alone: 0.84, oracle_residual.py):
    noise on the rotation adds variance to the return and nothing the task needs. Measured on `coarse` (seed 1, 100
    episodes): 0.43 and 0.34 at 50k and 100k steps (all dimensions: 0.40, 0.36), 0.19 at 50k with --noise-repeat
    100 (a held tilt was not what spoiled held noise), 0.19 at 50k with --init-std 0.6: no gain, so all dimensions
    stay the default"""

    # algorithm
    num_steps: int = 500
    """steps per env per rollout (batch = num_envs * num_steps): 2 CPU envs need long rollouts for a usable batch"""
    gamma: float = 0.97
    """the discount factor (ManiSkill's PPO setting for this task)"""
    gae_lambda: float = 0.9
    """the lambda of generalised advantage estimation"""
    learning_rate: float = 3e-4
    """the learning rate of the optimizer"""
    anneal_lr: bool = False
    """whether to anneal the learning rate linearly to zero"""
    num_minibatches: int = 4
    """minibatches per epoch"""
    update_epochs: int = 10
    """epochs over each rollout"""
    norm_adv: bool = True
    """whether to normalise advantages per minibatch"""
    clip_coef: float = 0.2
    """the PPO ratio clipping coefficient"""
    clip_vloss: bool = False
    """whether to clip the value loss like the policy's (off: Andrychowicz et al. 2021 found it does not help)"""
    ent_coef: float = 0.0
    """entropy bonus; zero because exploration is the (small) std itself, and a bonus would push it up"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """gradient clipping norm"""
    target_kl: Optional[float] = 0.05
    """stop an iteration's epochs once the approximate KL exceeds this: keeps the residual near the policy that
    collected the data, which matters more when a small std makes the ratio sharp (None: never stop)"""
    init_std: float = 0.3
    """initial std of the residual's pre-tanh Gaussian (scale * init_std in action units: ~3 mm per step here)"""
    fixed_std: bool = False
    """whether the std stays at init_std (ResiP: a fixed small std stops the entropy from collapsing or blowing up)"""
    noise_repeat: int = 1
    """hold each env's exploration noise eps (u = mu + std * eps) for this many steps, redrawn at every episode start
    (1: fresh noise every step). The coarse base's error is a per-episode offset, and its servo averages fresh noise
    away: a steady shift is what must be explored, as in gSDE (Raffin et al. 2021); the ratio stays the per-step
    Gaussian's, as in gSDE. Measured on `coarse` (1 seed, 100 episodes): 100 (a draw per episode) made it worse, 0.23
    and 0.20 at 50k and 100k steps against 0.40 and 0.36 with fresh noise; held noise spoils training episodes (train
    success 0.0-0.3, also when held on the translation only, --residual-dims 0 1 2), so 1 stays the default"""
    norm_obs: bool = True
    """whether to normalise states with running statistics (saved in checkpoints)"""
    norm_reward: bool = True
    """whether to scale rewards by the running std of the discounted return (saved in checkpoints)"""
    hidden_dim: int = 256
    """width of the actor and critic MLPs"""

    # speed
    compile: bool = False
    """whether to torch.compile the update and policy functions"""
    threads: int = 1
    """torch threads of the learner when it runs on the CPU: the env workers are processes of their own, and a second
    learner thread that fights them for 2 cores made an update 2.3x slower (python benchmarks/update_threads.py)"""


ARCH_ARGS = ("env_id", "control_mode", "residual_scale", "residual_sees_base", "task_features",
             "hidden_dim", "norm_obs", "residual_dims")
EPISODE_KEYS = ("return", "episode_len", "success_once", "success_at_end")


def layer_init(layer, std=math.sqrt(2), bias=0.0):
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class Agent(nn.Module):
    """Gaussian residual over a pre-tanh action u, and a value function, both on s_RL = [normalised s, a_base].
    u has one entry per dimension in `dims` (all by default); `expand` puts zeros on the others."""

    def __init__(self, obs_dim, act_dim, hidden, init_std, fixed_std, dims=None):
        super().__init__()
        self.full_dim = act_dim
        self.register_buffer("dims", torch.arange(act_dim) if dims is None else torch.tensor(dims), persistent=False)
        act_dim = len(self.dims)
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)), nn.Tanh(), layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, 1), std=1.0),
        )
        self.actor_mean = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)), nn.Tanh(), layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, act_dim), std=0.0),  # exactly zero: the untrained residual is the base
        )
        self.actor_logstd = nn.Parameter(torch.full((1, act_dim), math.log(init_std)), requires_grad=not fixed_std)

    def get_value(self, x):
        return self.critic(x)[:, 0]

    def get_action_and_value(self, x, u=None, noise=None):
        mean = self.actor_mean(x)
        std = self.actor_logstd.expand_as(mean).exp()
        dist = torch.distributions.Normal(mean, std, validate_args=False)  # NaN reaches the loss check
        if u is None:
            u = dist.sample() if noise is None else mean + std * noise  # noise: held standard-normal draws
        # PPO's ratio is taken on u; tanh(u) is part of the env's side (a fixed squashing shared by old and new policy)
        return u, dist.log_prob(u).sum(-1), dist.entropy().sum(-1), self.critic(x)[:, 0]

    def expand(self, y):
        """(..., len(dims)) -> (..., act_dim), zero on the dimensions the residual leaves alone."""
        if len(self.dims) == self.full_dim:
            return y
        return y.new_zeros(*y.shape[:-1], self.full_dim).index_copy(y.dim() - 1, self.dims, y)


def hold_noise(noise, age, repeat):
    """Exploration noise held for `repeat` steps (--noise-repeat): the rows of envs whose draw is a multiple of
    `repeat` steps old (age counts steps since the last draw or the episode's start) are redrawn, the others kept."""
    return torch.where((age % repeat == 0)[:, None], torch.randn_like(noise), noise)


def compute_gae(rewards, values, next_values, terminated, dones, gamma, gae_lambda):
    """Generalised advantage estimation over a (T, B) rollout with partial resets.

    next_values[t] is V of the state reached after step t: the next step's start state, or the final observation
    when the episode ended at t. Termination (success) means no future: bootstrap with 0. Truncation (time limit)
    still has a future: bootstrap with V(final observation). Either way the advantage does not flow across an
    episode boundary (dones cuts the recursion).
    """
    T = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[0])
    for t in reversed(range(T)):
        delta = rewards[t] + gamma * (1.0 - terminated[t]) * next_values[t] - values[t]
        lastgaelam = delta + gamma * gae_lambda * (1.0 - dones[t]) * lastgaelam
        advantages[t] = lastgaelam
    return advantages, advantages + values


if __name__ == "__main__":

    def main():
        args = tyro.cli(Args)
        # ---- validate and derive ----
        for name in ("num_envs", "num_eval_envs", "num_eval_episodes", "eval_freq", "num_steps", "num_minibatches",
                     "update_epochs", "noise_repeat"):
            if getattr(args, name) < 1:
                raise common.ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.residual_scale <= 0:
            raise common.ConfigError(f"--residual-scale must be > 0, got {args.residual_scale}")
        if args.init_std <= 0:
            raise common.ConfigError(f"--init-std must be > 0, got {args.init_std}")
        if args.total_timesteps < 0:
            raise common.ConfigError("--total-timesteps must be >= 0")
        batch_size = args.num_envs * args.num_steps
        if batch_size % args.num_minibatches:
            raise common.ConfigError(f"--num-envs * --num-steps ({batch_size}) must divide by --num-minibatches "
                                     f"({args.num_minibatches})")
        minibatch_size = batch_size // args.num_minibatches
        num_iterations = args.total_timesteps // batch_size
        if not args.reward_lateral >= 0:
            raise common.ConfigError(f"--reward-lateral must be >= 0, got {args.reward_lateral}")
        if args.save_trajectories and not args.evaluate:
            raise common.ConfigError("--save-trajectories needs --evaluate --checkpoint C")
        if args.evaluate and not args.checkpoint:
            raise common.ConfigError("--evaluate needs --checkpoint C")
        if not args.evaluate:  # now, not after the evaluation envs have started
            common.check_num_envs(args.num_envs, args.sim_backend)
        images = common.base_needs_images(args.base)
        ckpt = common.load_checkpoint(args.checkpoint, "ppo_residual.py", args.base) if args.checkpoint else None
        if ckpt:  # the policy is defined by these: take them from the checkpoint, whatever the command line says
            for name in ARCH_ARGS:
                setattr(args, name, ckpt["args"].get(name))  # residual_dims: None in checkpoints older than it
            args.reward_lateral = ckpt["args"].get("reward_lateral", 0.0)  # the task it learned
        run_name = ckpt["run_name"] if ckpt and not args.evaluate else f"{args.exp_name}__{args.seed}__{int(time.time())}"

        # ---- seed, device, envs ----
        common.seed_everything(args.seed, args.torch_deterministic)
        if args.threads < 1:
            raise common.ConfigError(f"--threads must be >= 1, got {args.threads}")
        device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        if device.type == "cpu":
            torch.set_num_threads(args.threads)
        reward_cfg = common.StagedRewardConfig(d3=args.reward_lateral)
        eval_envs = common.make_env(args.num_eval_envs, args.sim_backend, env_id=args.env_id,
                                    control_mode=args.control_mode, reward=args.reward, reward_cfg=reward_cfg,
                                    images=images, eval_mode=True, seed=args.seed + 10_000,
                                    record_dir=args.save_trajectories,
                                    video_dir=f"runs/{run_name}/videos" if args.capture_video else None,
                                    max_episode_steps=args.max_episode_steps)
        envs = None
        if not args.evaluate:
            envs = common.make_env(args.num_envs, args.sim_backend, env_id=args.env_id,
                                   control_mode=args.control_mode, reward=args.reward, reward_cfg=reward_cfg,
                                   images=images, seed=args.seed,
                                   max_episode_steps=args.max_episode_steps)
        act_dim, state_dim = eval_envs.action_dim, eval_envs.state_dim
        res_dim = state_dim + (common.TASK_FEATURE_DIM if args.task_features else 0)
        obs_dim = res_dim + (act_dim if args.residual_sees_base else 0)
        eval_base = common.make_base_policy(args.base, eval_envs, seed=args.seed)
        if args.residual_dims is not None and (not args.residual_dims or len(set(args.residual_dims)) < len(
                args.residual_dims) or not all(0 <= d < act_dim for d in args.residual_dims)):
            raise common.ConfigError(f"--residual-dims must be distinct action dimensions in [0, {act_dim}), got "
                                     f"{' '.join(map(str, args.residual_dims))}")

        # ---- networks ----
        agent = Agent(obs_dim, act_dim, args.hidden_dim, args.init_std, args.fixed_std, args.residual_dims).to(device)
        u_dim = len(agent.dims)  # the residual's own action size (--residual-dims)
        optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.learning_rate,
                                     eps=1e-5)
        obs_rms = common.RunningMeanStd(res_dim, device=device)
        return_rms = common.RunningMeanStd((), device=device)

        def rl_obs(state, a_base, res_state=None):
            """s_RL = [normalised (s, task features), a_base] (a_base is already in [-1, 1]); `res_state`: the
            (s, task features) part if already computed."""
            s = common.residual_state(state, args.task_features) if res_state is None else res_state
            s = obs_rms.normalize(s) if args.norm_obs else s
            return torch.cat([s, a_base], -1) if args.residual_sees_base else s

        def deterministic_residual(obs, a_base):
            with torch.no_grad():
                a_res = agent.expand(agent.actor_mean(rl_obs(obs["state"].to(device), a_base.to(device))).tanh())
            return torch.where(torch.isfinite(a_res), a_res, 0.0).to(a_base.device)

        if ckpt:
            try:
                agent.load_state_dict(ckpt["agent"])
                obs_rms.load_state_dict(ckpt["obs_rms"])
            except (RuntimeError, KeyError) as err:
                raise common.ConfigError(f"{args.checkpoint} does not fit this script's networks: "
                                         f"{str(err).splitlines()[0]}") from None

        if args.evaluate:
            trace = [] if args.save_trajectories else None
            stats = common.evaluate(eval_envs, eval_base, args.num_eval_episodes, deterministic_residual,
                                    args.residual_scale, seed=args.seed + 10_000, trace=trace)
            eval_envs.close()  # flushes the recordings
            if args.save_trajectories:
                stats["saved_episodes"] = common.keep_successful_trajectories(
                    args.save_trajectories, trace, args.num_eval_envs, args.residual_scale)
            print(json.dumps({f"eval/{k}": v for k, v in stats.items()}))
            return

        base = common.make_base_policy(args.base, envs, seed=args.seed)
        logger = common.Logger(run_name, args)
        ckpt_path = os.path.join(logger.dir, "ckpt.pt")
        global_step, iteration, eval_base_stats = 0, 0, None
        if ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
            return_rms.load_state_dict(ckpt["return_rms"])
            global_step, iteration, eval_base_stats = ckpt["global_step"], ckpt["iteration"], ckpt["eval_base"]
            common.set_rng_state(ckpt["rng"])
            print(f"resumed {args.checkpoint} at step {global_step}")

        # ---- rollout storage on the training device ----
        b_shape = (args.num_steps, args.num_envs)
        obs_buf = torch.zeros(b_shape + (obs_dim,), device=device)
        u_buf = torch.zeros(b_shape + (u_dim,), device=device)
        logprobs, rewards, values, final_values, terminateds, dones = (torch.zeros(b_shape, device=device)
                                                                       for _ in range(6))

        # ---- pure update and policy functions (LeanRL style, so --compile can wrap them) ----
        def policy_step(x, noise=None):
            with torch.no_grad():
                u, logprob, _, value = agent.get_action_and_value(x, noise=noise)
            return u, logprob, value

        def update(mb_obs, mb_u, mb_logprobs, mb_advantages, mb_returns, mb_values):
            _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb_obs, mb_u)
            logratio = newlogprob - mb_logprobs
            ratio = logratio.exp()
            with torch.no_grad():  # http://joschu.net/blog/kl-approx.html
                old_approx_kl = (-logratio).mean()
                approx_kl = ((ratio - 1) - logratio).mean()
                clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
            if args.norm_adv:
                mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
            pg_loss = torch.max(-mb_advantages * ratio,
                                -mb_advantages * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
            if args.clip_vloss:
                v_clipped = mb_values + (newvalue - mb_values).clamp(-args.clip_coef, args.clip_coef)
                v_loss = 0.5 * torch.max((newvalue - mb_returns) ** 2, (v_clipped - mb_returns) ** 2).mean()
            else:
                v_loss = 0.5 * ((newvalue - mb_returns) ** 2).mean()
            entropy_loss = entropy.mean()
            loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
            return torch.stack([v_loss, pg_loss, entropy_loss, old_approx_kl, approx_kl, clipfrac]).detach()

        if args.compile:
            policy_step, update = torch.compile(policy_step), torch.compile(update)

        def run_eval():
            nonlocal eval_base_stats
            t0 = time.perf_counter()
            if eval_base_stats is None:  # the base alone, once: the line the residual must beat
                eval_base_stats = common.evaluate(eval_envs, eval_base, args.num_eval_episodes,
                                                  seed=args.seed + 10_000)
            stats = common.evaluate(eval_envs, eval_base, args.num_eval_episodes, deterministic_residual,
                                    args.residual_scale, seed=args.seed + 10_000)
            logger.log({f"eval/{k}": v for k, v in stats.items() if k != "episodes"}, global_step)
            logger.log({f"eval_base/{k}": v for k, v in eval_base_stats.items() if k != "episodes"}, global_step)
            logger.log({"time/eval": time.perf_counter() - t0}, global_step)
            print(f"step {global_step}: eval success_at_end {stats['success_at_end']:.2f} (base alone "
                  f"{eval_base_stats['success_at_end']:.2f}), success_once {stats['success_once']:.2f}, "
                  f"return {stats['return']:.2f} over {stats['episodes']} episodes", flush=True)

        def restart_envs():
            """Reset every train env with a seed derived from the step: a checkpoint taken here resumes exactly."""
            obs = envs.reset(seed=args.seed + global_step, reconfigure=True)
            base.reset(torch.ones(args.num_envs, dtype=torch.bool, device=envs.device), seed=args.seed + global_step)
            return obs, base(obs).to(device), torch.zeros(args.num_envs, device=device)

        # --noise-repeat: each env's held noise and its age in steps (0: draw afresh), restarted with the envs
        noise = torch.zeros(args.num_envs, u_dim, device=device)
        noise_age = torch.zeros(args.num_envs, dtype=torch.long, device=device)

        def save():
            if not all(torch.isfinite(p).all() for p in agent.parameters()):
                raise FloatingPointError(f"non-finite weights at step {global_step}")
            if args.save_model:
                common.save_checkpoint(ckpt_path, dict(
                    script="ppo_residual.py", base=args.base, args=vars(args), run_name=run_name,
                    agent=agent.state_dict(), optimizer=optimizer.state_dict(), obs_rms=obs_rms.state_dict(),
                    return_rms=return_rms.state_dict(), global_step=global_step, iteration=iteration,
                    eval_base=eval_base_stats, rng=common.rng_state(),
                ))

        # ---- training loop ----
        obs, a_base, disc_return = restart_envs()  # disc_return: the discounted return the reward scale follows
        if ckpt is None:
            run_eval()
            save()  # a good checkpoint from the start, for --evaluate and for a run that diverges early
        env_device = envs.device
        next_eval = (global_step // args.eval_freq + 1) * args.eval_freq
        t_start, steps_at_start = time.perf_counter(), global_step
        t_rollout = t_update = 0.0
        sim_time_at_start = envs.sim_time
        # Ctrl-C asks the loop to stop at the end of the current iteration, where a checkpoint can resume exactly;
        # a second Ctrl-C interrupts at once.
        stop_requested = []
        signal.signal(signal.SIGINT, lambda *_: (stop_requested.append(True),
                                                 signal.signal(signal.SIGINT, signal.default_int_handler)))
        try:
            while iteration < num_iterations:
                iteration += 1
                if args.anneal_lr:
                    optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - (iteration - 1.0) / num_iterations)
                ep_sums = torch.zeros(5, device=device)  # finished episodes: count, return, len, success once/at end
                term_sums = torch.zeros(len(common.REWARD_TERMS), device=device)
                norm_sums = torch.zeros(2, device=device)  # |a_base|, |scale * a_res|

                # ---- rollout ----
                t0 = time.perf_counter()
                for step in range(args.num_steps):
                    state = obs["state"].to(device)
                    res_state = common.residual_state(state, args.task_features)
                    if args.norm_obs:
                        obs_rms.update(res_state)
                    x = rl_obs(state, a_base, res_state)
                    if args.noise_repeat > 1:
                        noise = hold_noise(noise, noise_age, args.noise_repeat)
                        u, logprob, value = policy_step(x, noise)
                    else:
                        u, logprob, value = policy_step(x)
                    # A diverged policy must not send NaN to the simulator; the loss check below stops the run.
                    a_res = agent.expand(torch.where(torch.isfinite(u), u, 0.0).tanh())
                    action = common.compose_action(a_base, a_res, args.residual_scale)
                    next_obs, reward, terminated, truncated, info = envs.step(action.to(env_device))
                    done = terminated | truncated
                    base.reset(done)
                    next_a_base = base(next_obs).to(device)
                    noise_age = (noise_age + 1) * ~done.to(device)
                    reward, terminated, done = reward.to(device), terminated.to(device).float(), done.to(device)
                    if args.norm_reward:  # scale by the std of the discounted return (CleanRL's NormalizeReward)
                        disc_return = disc_return * args.gamma + reward
                        return_rms.update(disc_return)
                        disc_return = disc_return * (~done)
                        reward = reward / torch.sqrt(return_rms.var.float() + 1e-8)
                    obs_buf[step], u_buf[step], logprobs[step], values[step] = x, u, logprob, value
                    rewards[step], terminateds[step], dones[step] = reward, terminated, done.float()
                    # At an episode end the bootstrap value is V(final observation); the base is not queried there
                    # (a chunked VLA would spend a query on a state it never acts from): a_base stands in for a_base'.
                    # On a GPU it is computed for every env and masked, cheaper than a device sync on done.any(); on
                    # the CPU, where the check costs nothing, only at steps where an episode ended (~1 in 50).
                    final_values[step] = 0.0
                    if device.type != "cpu" or done.any():
                        with torch.no_grad():
                            final_x = rl_obs(info["final_obs"]["state"].to(device), a_base)
                            final_values[step] = torch.where(done, agent.get_value(final_x), 0.0)
                    # bookkeeping stays on the device: no .item() in the loop
                    d, ep = done.float(), info["episode"]
                    ep_sums += torch.stack([d.sum()] + [(ep[k].to(device).float() * d).sum() for k in EPISODE_KEYS])
                    if args.reward == "staged":
                        term_sums += torch.stack([info[f"reward/{k}"].to(device).sum() for k in common.REWARD_TERMS])
                    norm_sums += torch.stack([a_base.norm(dim=-1).sum(),
                                              (args.residual_scale * a_res).norm(dim=-1).sum()])
                    obs, a_base = next_obs, next_a_base
                global_step += batch_size
                t_rollout += time.perf_counter() - t0

                # ---- advantages: next_values[t] is V of the state reached after step t ----
                t0 = time.perf_counter()
                with torch.no_grad():
                    last_value = agent.get_value(rl_obs(obs["state"].to(device), a_base))
                    next_values = torch.where(dones.bool(), final_values, torch.cat([values[1:], last_value[None]]))
                    advantages, returns = compute_gae(rewards, values, next_values, terminateds, dones, args.gamma,
                                                      args.gae_lambda)

                # ---- update ----
                b_obs, b_u = obs_buf.reshape(batch_size, obs_dim), u_buf.reshape(batch_size, u_dim)
                b_logprobs, b_advantages, b_returns, b_values = (t.reshape(-1) for t in (logprobs, advantages,
                                                                                        returns, values))
                stats, num_mb = torch.zeros(6, device=device), 0
                for epoch in range(args.update_epochs):
                    b_inds = torch.randperm(batch_size, device=device)
                    for start in range(0, batch_size, minibatch_size):
                        mb = b_inds[start : start + minibatch_size]
                        stats += update(b_obs[mb], b_u[mb], b_logprobs[mb], b_advantages[mb], b_returns[mb],
                                        b_values[mb])
                        num_mb += 1
                    # one sync per epoch for early stopping, not one per minibatch
                    if args.target_kl is not None and stats[4] / num_mb > args.target_kl:
                        break
                t_update += time.perf_counter() - t0

                # ---- logging, once per iteration ----
                v_loss, pg_loss, entropy, old_kl, kl, clipfrac = (stats / num_mb).tolist()
                if not all(math.isfinite(v) for v in (v_loss, pg_loss, kl)):
                    raise FloatingPointError(f"non-finite loss at step {global_step}")
                var_y = b_returns.var()
                explained_var = (1 - (b_returns - b_values).var() / var_y).item() if var_y > 0 else float("nan")
                n, *ep_means = ep_sums.tolist()
                logs = {f"train/{k}": v / n for k, v in zip(EPISODE_KEYS, ep_means)} if n > 0 else {}
                if args.reward == "staged":
                    logs.update({f"reward/{k}": v / batch_size for k, v in zip(common.REWARD_TERMS, term_sums.tolist())})
                nb, nr = (norm_sums / batch_size).tolist()
                sps = (global_step - steps_at_start) / (time.perf_counter() - t_start)
                t_env = envs.sim_time - sim_time_at_start
                env_sps = (global_step - steps_at_start) / t_env  # throughput as a ratio within this run
                logs.update({
                    "losses/value_loss": v_loss, "losses/policy_loss": pg_loss, "losses/entropy": entropy,
                    "losses/old_approx_kl": old_kl, "losses/approx_kl": kl, "losses/clipfrac": clipfrac,
                    "losses/explained_variance": explained_var, "losses/epochs": epoch + 1,
                    "residual/base_action_norm": nb, "residual/residual_action_norm": nr,
                    "residual/std": agent.actor_logstd.exp().mean().item(),
                    "charts/SPS": sps, "charts/env_SPS": env_sps, "charts/SPS_over_env_SPS": sps / env_sps,
                    "charts/learning_rate": optimizer.param_groups[0]["lr"],
                    "time/rollout": t_rollout, "time/update": t_update, "time/env": t_env,
                })
                logger.log(logs, global_step)
                print(f"step {global_step}/{num_iterations * batch_size} | SPS {sps:.0f} ({sps / env_sps:.2f} of env) "
                      f"| train success_once {logs.get('train/success_once', float('nan')):.2f} return "
                      f"{logs.get('train/return', float('nan')):.2f} | |a_res| {nr:.3f} | kl {kl:.4f}", flush=True)

                if global_step >= next_eval or iteration == num_iterations:
                    next_eval = (global_step // args.eval_freq + 1) * args.eval_freq
                    t0 = time.perf_counter()
                    run_eval()
                    obs, a_base, disc_return = restart_envs()
                    noise_age.zero_()
                    save()
                    t_start += time.perf_counter() - t0  # SPS counts training time only
                if stop_requested:
                    print(f"interrupted at step {global_step}: saving {ckpt_path}", file=sys.stderr)
                    obs, a_base, disc_return = restart_envs()
                    noise_age.zero_()
                    save()
                    sys.exit(130)
        except FloatingPointError as err:
            print(f"error: {err}; stopping, the last good checkpoint is {ckpt_path}", file=sys.stderr)
            sys.exit(1)
        finally:
            envs.close()
            eval_envs.close()
            logger.close()

    common.exit_on_config_error(main)
