"""Search over latent actions: best-of-N, beam search and MCTS, scored by a reward.

Each step of a search picks one of the model's ``num_actions`` actions and the world model writes one token
under it. Three methods share one budget and one reward:

* ``best_of_n``: n action sequences sampled from the policy (``model.generate``), the best by reward;
* ``beam``: beam search over actions, ranked by the policy's summed action log-probabilities (plus, optionally,
  ``value_weight * value``: a callable on the text, or ``"q"``, the model's learned Q(s, a)), the final beams
  picked by reward;
* ``mcts``: PUCT over actions with the policy as prior (CoLA's settings as defaults: cpuct 0.7, 5 branches at
  the root, 4 below). Expanding a node scores all its actions with ONE ``model.fanout`` call (or, with
  ``expansion="topk"``, writes only the likeliest actions' tokens); a new node is valued by a policy rollout to
  the end, scored by the reward, or by a ``value``: a callable on partial text, or ``"q"``, the model's learned
  action-value head (``bwarea rl --algo q``), which costs no world-model evaluation at all.

Budget: world-model token evaluations. Every token the world model writes under an action counts 1 per row:
a greedy or sampled sequence of k new tokens costs k (EOS ends it early, and what is not written is not paid
for), a fan-out over one context costs ``num_actions`` (it writes a next-token distribution for every action),
a beam step costs one per (beam, branch) row. Re-reading a context (prefill) and the policy's own forward passes
are not counted. Before any work the search checks that the most it can cost fits in what is left, so the
budget is never exceeded; the search stops at the first step it cannot pay for.

Greedy first: every method starts by writing the policy's greedy sequence (argmax actions, argmax tokens) and
scoring it, paid from the budget. It is the first candidate and is only replaced by a strictly better one, so
no method returns a sequence the reward scores below the greedy one.

Contexts: a step writes its token with the context labelled as a prompt is labelled by ``generate`` and
``fanout``: the inverse dynamics gives the actions of the earlier positions, the chosen action is applied at the
last one. Rollouts and ``best_of_n`` samples are written by ``generate`` from there. The returned ``actions``
are the actions chosen at each step; the tokens are what the model wrote under them.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

METHODS = ("mcts", "beam", "best_of_n")

# CoLA's MCTS settings (PUCT constant, children kept at the root and below).
CPUCT = 0.7
ROOT_BRANCHES = 5
LOWER_BRANCHES = 4
BEAM_BRANCHES = 4
SAMPLE_CHUNK = 32  # best_of_n rows per generate call (fixed, so results do not depend on it)
TOP = 10  # alternatives a result lists (beams, samples); MCTS lists every root child

# The options each method takes, beyond the common arguments of `search`.
OPTIONS = {
    "best_of_n": {"n", "action_temperature"},
    "beam": {"beams", "branches", "value", "value_weight"},
    "mcts": {"cpuct", "root_branches", "lower_branches", "rounds", "rollout_action_temperature", "value",
             "expansion"},
}
EXPANSIONS = ("fanout", "topk")
Q = "q"  # value="q": the model's learned action-value head (config.value_head), in place of rollouts


@dataclass
class SearchStats:
    """What a search did. ``evaluations`` <= ``budget`` always (see the module docstring for the count)."""

    evaluations: int = 0      # world-model token evaluations spent
    budget: int = 0
    nodes: int = 0            # mcts: tree nodes (root included); beam: beams kept over all steps; best_of_n: samples
    rounds: int = 0           # mcts rounds, beam steps, best_of_n generate calls
    fanouts: int = 0          # model.fanout calls (each num_actions evaluations)
    sequences: int = 0        # complete sequences scored by the reward (greedy included)
    wall_time: float = 0.0    # seconds


@dataclass
class SearchResult:
    """The best sequence a search found.

    sequence: prompt ids + completion ids; completion_ids: the new tokens (EOS included when written);
    actions: one action per new token, the action that wrote it; reward: the reward of the completion;
    greedy_*: the policy's greedy sequence, which every search scores first; top: the alternatives (mcts:
    every root child, by visits; beam: the final beams, best_of_n: the samples, up to 10 by reward), dicts with ``action``, ``visits``,
    ``value``, ``text`` where they apply.
    """

    method: str
    sequence: list[int]
    completion_ids: list[int]
    completion: str
    actions: list[int]
    reward: float
    greedy_completion: str
    greedy_actions: list[int]
    greedy_reward: float
    stats: SearchStats
    top: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Budget:
    """World-model token evaluations: ``fits(n)`` before work, ``spend(n)`` after, never past ``limit``."""

    def __init__(self, limit: int, progress: Callable[[int, int], None] | None = None):
        self.limit, self.spent, self.progress = limit, 0, progress

    @property
    def left(self) -> int:
        return self.limit - self.spent

    def fits(self, n: int) -> bool:
        return self.spent + n <= self.limit

    def spend(self, n: int) -> None:
        if not self.fits(n):  # a bug in a method: it must check fits() with the most the work can cost
            raise RuntimeError(f"search spent {self.spent + n} evaluations, over its budget {self.limit}")
        self.spent += n
        if self.progress is not None and n:
            self.progress(self.spent, self.limit)


@dataclass
class _Candidate:
    tokens: tuple
    actions: tuple
    reward: float


def _as_reward_set(reward, what: str, timeout):
    """A reward spec string, a callable, a list of them, or a RewardSet -> RewardSet (values checked)."""
    from .rl.rewards import Reward, RewardSet, load_reward

    if isinstance(reward, RewardSet):
        return reward
    if reward is None:
        raise ValueError(f"search needs a {what}: a callable reward(prompts, completions, **kwargs) -> list[float], "
                         "a built-in task name, or 'path/to/file.py:function'")
    items = list(reward) if isinstance(reward, (list, tuple)) else [reward]
    rewards = []
    for item in items:
        if isinstance(item, str):
            rewards.append(Reward(item, load_reward(item)))
        elif callable(item):
            rewards.append(Reward(getattr(item, "__name__", type(item).__name__), item))
        else:
            raise ValueError(f"{what} must be a callable, a task name or 'file.py:function', got "
                             f"{type(item).__name__}")
    return RewardSet(rewards, timeout=timeout)


class _Scorer:
    """Scores completions (token tuples) with a RewardSet, once per distinct completion."""

    def __init__(self, rewards, tokenizer, prompt: str):
        self.rewards, self.tokenizer, self.prompt, self.cache = rewards, tokenizer, prompt, {}

    def __call__(self, completions: list[tuple]) -> list[float]:
        new = list(dict.fromkeys(c for c in completions if c not in self.cache))
        if new:
            texts = self.tokenizer.batch_decode([list(c) for c in new], skip_special_tokens=True)
            total, valid, _ = self.rewards.score([self.prompt] * len(new), texts, completion_ids=[list(c) for c in new])
            for c, v, ok in zip(new, total.tolist(), valid.tolist()):
                # A RewardSet built with skip_bad marks bad values invalid: such a sequence is never chosen.
                self.cache[c] = v if ok else -math.inf
        return [self.cache[c] for c in completions]


class _Search:
    """State shared by the methods: the model, the prompt, the budget, the reward and the candidates."""

    def __init__(self, model, tokenizer, prompt_ids: list[int], scorer, budget: Budget, max_new_tokens: int,
                 temperature: float, generator, stats: SearchStats):
        self.model, self.tokenizer, self.prompt_ids = model, tokenizer, prompt_ids
        self.scorer, self.budget, self.max_new_tokens = scorer, budget, max_new_tokens
        self.temperature, self.generator, self.stats = temperature, generator, stats
        self.device = next(model.parameters()).device
        eos = model.config.eos_token_id
        self.eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        pad = model.config.pad_token_id
        self.pad = pad if pad is not None else (min(self.eos) if self.eos else 0)
        self.best: _Candidate | None = None

    def ids(self, rows: list[tuple]) -> torch.Tensor:
        """Completions of equal length -> (rows, prompt + length) contexts."""
        return torch.tensor([self.prompt_ids + list(r) for r in rows], dtype=torch.long, device=self.device)

    def done(self, tokens: tuple) -> bool:
        return len(tokens) >= self.max_new_tokens or (bool(tokens) and tokens[-1] in self.eos)

    def write(self, contexts: list[tuple], steps: int, actions=None, action_greedy=False,
              action_temperature=None) -> list[tuple[tuple, tuple]]:
        """``generate`` ``steps`` tokens after each context (all of one length); pays what it writes.

        -> [(new tokens, their actions)] per row, ending at EOS. The caller checked ``fits(rows * steps)``.
        ``action_temperature`` None samples actions at the model's own (config.action_temperature).
        """
        info = self.model.get_action_info()["action_idx"]
        kept = len(info)
        sampling = self.temperature > 0
        out = self.model.generate(
            self.ids(contexts), max_new_tokens=steps, do_sample=sampling,
            temperature=self.temperature if sampling else None, pad_token_id=self.pad, return_dict_in_generate=True,
            actions=actions, action_greedy=action_greedy, action_temperature=action_temperature,
            generator=self.generator)
        del info[kept:]  # the search's own calls stay out of the model's action record
        width, rows = out.prompt_length, []
        for r in range(len(contexts)):
            m = out.new_token_mask[r].bool()
            rows.append((tuple(out.sequences[r, width:][m].tolist()), tuple(out.actions[r][m].tolist())))
        self.budget.spend(sum(len(t) for t, _ in rows))
        return rows

    def offer(self, tokens: tuple, actions: tuple) -> float:
        """Score a complete sequence; it becomes the best only when strictly better than the best so far."""
        reward = self.scorer([tokens])[0]
        self.stats.sequences += 1
        if self.best is None or reward > self.best.reward:
            self.best = _Candidate(tokens, actions, reward)
        return reward

    def greedy(self) -> _Candidate:
        (tokens, actions), = self.write([()], self.max_new_tokens, action_greedy=True)
        self.offer(tokens, actions)
        return self.best

    def text(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)


# ----- best-of-N --------------------------------------------------------------------------------------------
def _best_of_n(s: _Search, n: int | None = None, action_temperature: float | None = None) -> list[dict]:
    """n sequences with actions sampled from the policy (as many as the budget pays for when n is None)."""
    if n is not None and s.budget.left < n * s.max_new_tokens:
        raise ValueError(f"best_of_n: n={n} samples of up to {s.max_new_tokens} tokens need {n * s.max_new_tokens} "
                         f"evaluations; {s.budget.left} are left after the greedy sequence: raise the budget or "
                         "lower n")
    samples, todo = [], n
    while True:
        rows = min(SAMPLE_CHUNK, s.budget.left // s.max_new_tokens)
        if todo is not None:
            rows = min(rows, todo - len(samples))
        if rows < 1:
            break
        s.stats.rounds += 1
        for tokens, actions in s.write([()] * rows, s.max_new_tokens, action_temperature=action_temperature):
            samples.append((s.offer(tokens, actions), tokens, actions))
    s.stats.nodes = len(samples)
    samples.sort(key=lambda x: -x[0])  # stable: equal rewards keep sampling order
    return [{"reward": r, "actions": list(a), "text": s.text(t)} for r, t, a in samples[:TOP]]


# ----- beam search ------------------------------------------------------------------------------------------
def _beam(s: _Search, beams: int | None = None, branches: int = BEAM_BRANCHES, value=None,
          value_weight: float = 1.0) -> list[dict]:
    """Beam search over actions: each step every live beam proposes its ``branches`` likeliest actions, the world
    model writes their tokens in one ``generate`` call, and the ``beams`` best by summed action log-probability
    (+ ``value_weight * value``) live on. A beam that writes EOS is finished. Candidates writing the same text are
    one candidate (the better-scored)."""
    n = s.model.config.num_actions
    if not 1 <= branches <= n:
        raise ValueError(f"beam: branches must be in 1..{n}, got {branches}")
    per_beam = branches * s.max_new_tokens
    if beams is None:
        beams = s.budget.left // per_beam
        if beams < 1:
            raise ValueError(f"beam: one beam of {branches} branches over {s.max_new_tokens} tokens needs {per_beam} "
                             f"evaluations; {s.budget.left} are left after the greedy sequence: raise the budget")
    elif beams * per_beam > s.budget.left:
        raise ValueError(f"beam: {beams} beams of {branches} branches over {s.max_new_tokens} tokens need "
                         f"{beams * per_beam} evaluations; {s.budget.left} are left after the greedy sequence")
    live = [(0.0, (), ())]  # (score, tokens, actions)
    finished = []
    for _ in range(s.max_new_tokens):
        if not live:
            break
        s.stats.rounds += 1
        contexts = [t for _, t, _ in live]
        logp = torch.log_softmax(s.model.policy_logits(s.ids(contexts))[:, -1].float(), dim=-1)
        q = s.model.action_values(s.ids(contexts))[:, -1] if value == Q else None  # Q(beam's state, action)
        top = logp.topk(branches, dim=-1)  # ties: the lower action first, as topk orders them
        rows = [(b, int(a), float(lp)) for b in range(len(live))
                for a, lp in zip(top.indices[b].tolist(), top.values[b].tolist())]
        written = s.write([live[b][1] for b, _, _ in rows], 1, actions=torch.tensor([[a] for _, a, _ in rows]))
        pool, q_of = {}, {}
        for (b, a, lp), (tok, _) in zip(rows, written):
            score, tokens, actions = live[b]
            cand = (score + lp, tokens + tok, actions + (a,))
            if cand[1] not in pool or cand[0] > pool[cand[1]][0]:
                pool[cand[1]] = cand
                q_of[cand[1]] = None if q is None else float(q[b, a])
        cands = list(pool.values())
        rank = [c[0] for c in cands]
        if value == Q:
            rank = [r + value_weight * q_of[c[1]] for r, c in zip(rank, cands)]
        elif value is not None:
            rank = [r + value_weight * v for r, v in zip(rank, value([c[1] for c in cands]))]
        order = sorted(range(len(cands)), key=lambda i: -rank[i])[:beams]
        live = []
        for i in order:
            (finished if s.done(cands[i][1]) else live).append(cands[i])
        s.stats.nodes += len(order)
    results = [(s.offer(t, a), score, t, a) for score, t, a in finished + live]
    results.sort(key=lambda x: -x[0])
    return [{"reward": r, "logprob": sc, "actions": list(a), "text": s.text(t)} for r, sc, t, a in results[:TOP]]


# ----- MCTS -------------------------------------------------------------------------------------------------
class _Node:
    __slots__ = ("tokens", "actions", "action", "aliases", "prior", "children", "visits", "value_sum",
                 "expanded", "exhausted", "best", "q")

    def __init__(self, tokens: tuple, actions: tuple, action: int | None, aliases: list[int], prior: float):
        self.tokens, self.actions, self.action, self.aliases, self.prior = tokens, actions, action, aliases, prior
        self.children: list[_Node] = []
        self.visits, self.value_sum = 0, 0.0
        self.expanded = self.exhausted = False
        self.best: tuple[float, tuple] | None = None  # best (reward, completion) found through this node
        self.q: float | None = None  # value="q": Q(parent, action), prior-weighted over the aliases

    @property
    def mean(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0


class _MCTS:
    """PUCT: score(child) = Q(child) + cpuct * P(child) * sqrt(N(parent)) / (1 + N(child)).

    Q is the child's mean value, normalised to [0, 1] by the lowest and highest values backed up so far (so cpuct
    means the same for any reward scale); an unvisited child takes its parent's mean. P is the policy's
    probability of the child's token: actions that write the same token are one child (its action is the likeliest
    of them, the others are its aliases), and the ``branches`` likeliest tokens are kept, priors renormalised.
    """

    def __init__(self, s: _Search, cpuct, root_branches, lower_branches, rounds, rollout_action_temperature, value,
                 expansion):
        n = s.model.config.num_actions
        if expansion not in EXPANSIONS:
            raise ValueError(f"mcts: expansion must be one of {', '.join(EXPANSIONS)}, got {expansion!r}")
        for name, b in (("root_branches", root_branches), ("lower_branches", lower_branches)):
            if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= n:
                raise ValueError(f"mcts: {name} must be an int in 1..{n}, got {b!r}")
        if not (isinstance(cpuct, (int, float)) and math.isfinite(cpuct) and cpuct >= 0):
            raise ValueError(f"mcts: cpuct must be a finite number >= 0, got {cpuct!r}")
        if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
            raise ValueError(f"mcts: rounds must be an int >= 1 or None (as many as the budget pays for), got "
                             f"{rounds!r}")
        _check_temperature("mcts: rollout_action_temperature", rollout_action_temperature, zero_ok=True)
        self.s, self.cpuct, self.rounds = s, float(cpuct), rounds
        self.root_branches, self.lower_branches = root_branches, lower_branches
        self.rollout_temperature, self.value, self.expansion = float(rollout_action_temperature), value, expansion
        self.low, self.high = math.inf, -math.inf
        self.root = _Node((), (), None, [], 1.0)
        s.stats.nodes = 1
        # With a value a leaf costs nothing, but the answer still needs one completed sequence.
        self.reserve = s.max_new_tokens if value is not None else 0

    def rollout_cost(self, node: _Node) -> int:
        return 0 if self.value is not None or self.s.done(node.tokens) else self.s.max_new_tokens - len(node.tokens)

    def fits(self, n: int) -> bool:
        return self.s.budget.fits(n + self.reserve)

    def expand_cost(self, node: _Node) -> int:
        """The most an expansion can cost: a fan-out, or one token per action tried (topk)."""
        if self.expansion == "fanout":
            return self.s.model.config.num_actions
        return self.root_branches if node is self.root else self.lower_branches

    def run(self) -> None:
        s = self.s
        if not self.fits(self.expand_cost(self.root)):
            return
        self.expand(self.root)
        while not self.root.exhausted and (self.rounds is None or s.stats.rounds < self.rounds):
            path = [self.root]
            node = self.root
            while node.expanded and not node.exhausted:
                node = self.select(node)
                path.append(node)
            if node.visits and not s.done(node.tokens):  # visited before: grow the tree below it
                rollout = s.max_new_tokens - len(node.tokens) - 1 if self.value is None else 0
                if not self.fits(self.expand_cost(node) + rollout):
                    break
                self.expand(node)
                node = self.select(node)
                path.append(node)
            elif not self.fits(self.rollout_cost(node)):
                break
            s.stats.rounds += 1
            value, completion = self.evaluate(node)
            self.backup(path, value, completion)
        if self.value is not None:
            self.complete_most_visited()

    def expand(self, node: _Node) -> None:
        """The next token under the node's actions; children are the likeliest distinct tokens.

        fanout: ONE fan-out writes the next token under every action (num_actions evaluations), so actions that
        write the same token pool their prior. topk: only the ``branches`` likeliest actions write their token
        (one evaluation each, one ``generate`` call); those writing the same token are one child.
        """
        s = self.s
        ids = s.ids([node.tokens])
        prior = torch.softmax(s.model.policy_logits(ids)[0, -1].float(), dim=-1)
        branches = self.root_branches if node is self.root else self.lower_branches
        order = torch.sort(prior, descending=True, stable=True).indices.tolist()
        if self.expansion == "fanout":
            logits = s.model.fanout(ids)[0]  # (num_actions, vocab)
            s.budget.spend(logits.shape[0])
            s.stats.fanouts += 1
            if s.temperature > 0:
                probs = torch.softmax(logits / s.temperature, dim=-1)
                tokens = torch.multinomial(probs, 1, generator=s.generator).squeeze(1).tolist()
            else:
                tokens = logits.argmax(-1).tolist()
            token_of = dict(enumerate(tokens))
        else:
            tried = order[:branches]
            written = s.write([node.tokens] * len(tried), 1, actions=torch.tensor([[a] for a in tried]))
            token_of = {a: tok[0] for a, (tok, _) in zip(tried, written)}
            order = tried
        groups: dict[int, list] = {}  # token -> [summed prior, actions by descending prior]
        for a in order:
            g = groups.setdefault(token_of[a], [0.0, []])
            g[0] += float(prior[a])
            g[1].append(a)
        kept = sorted(groups.items(), key=lambda kv: -kv[1][0])[:branches]  # stable: ties by likeliest action
        total = sum(p for _, (p, _) in kept)
        q = s.model.action_values(ids)[0, -1] if self.value == Q else None
        for token, (p, actions) in kept:
            child = _Node(node.tokens + (token,), node.actions + (actions[0],), actions[0], actions[1:], p / total)
            if q is not None:  # the actions writing this token, weighted by the policy
                weights = prior[actions]
                child.q = float((weights * q[actions]).sum() / weights.sum().clamp(min=1e-30))
            node.children.append(child)
        s.stats.nodes += len(kept)
        node.expanded = True

    def q(self, node: _Node, parent: _Node) -> float:
        mean = node.mean if node.visits else parent.mean
        return (mean - self.low) / (self.high - self.low) if self.high > self.low else 0.5

    def select(self, node: _Node) -> _Node:
        open_children = [c for c in node.children if not c.exhausted]
        root_n = math.sqrt(node.visits)
        # max keeps the first of equal scores: children are in descending prior order
        return max(open_children, key=lambda c: self.q(c, node) + self.cpuct * c.prior * root_n / (1 + c.visits))

    def evaluate(self, node: _Node) -> tuple[float, tuple | None]:
        """-> (value, complete sequence or None). Complete nodes are scored by the reward itself."""
        s = self.s
        if s.done(node.tokens):
            node.exhausted = True
            return s.offer(node.tokens, node.actions), node.tokens
        if self.value == Q:
            return node.q, None
        if self.value is not None:
            return self.value([node.tokens])[0], None
        greedy = self.rollout_temperature == 0
        (tokens, actions), = s.write([node.tokens], s.max_new_tokens - len(node.tokens), action_greedy=greedy,
                                     action_temperature=self.rollout_temperature or 1.0)
        completion = node.tokens + tokens
        return s.offer(completion, node.actions + actions), completion

    def backup(self, path: list[_Node], value: float, completion: tuple | None) -> None:
        self.low, self.high = min(self.low, value), max(self.high, value)
        for node in path:
            node.visits += 1
            node.value_sum += value
            if completion is not None and (node.best is None or value > node.best[0]):
                node.best = (value, completion)
        for node in reversed(path):  # a node is exhausted once every child is
            if node.expanded and all(c.exhausted for c in node.children):
                node.exhausted = True

    def complete_most_visited(self) -> None:
        """Value-guided search: follow the most visited children, then let the greedy policy finish."""
        s, node = self.s, self.root
        while node.children and any(c.visits for c in node.children):
            node = max(node.children, key=lambda c: c.visits)
        if s.done(node.tokens):
            s.offer(node.tokens, node.actions)
            return
        (tokens, actions), = s.write([node.tokens], s.max_new_tokens - len(node.tokens), action_greedy=True)
        s.offer(node.tokens + tokens, node.actions + actions)

    def top(self) -> list[dict]:
        s = self.s
        children = sorted(self.root.children, key=lambda c: (-c.visits, -c.prior))
        return [{"action": c.action, "aliases": c.aliases, "visits": c.visits, "value": c.mean, "prior": c.prior,
                 "token": s.text(c.tokens), "best_reward": None if c.best is None else c.best[0],
                 "text": None if c.best is None else s.text(c.best[1])} for c in children]


def _mcts(s: _Search, cpuct: float = CPUCT, root_branches: int = ROOT_BRANCHES, lower_branches: int = LOWER_BRANCHES,
          rounds: int | None = None, rollout_action_temperature: float = 1.0, value=None,
          expansion: str = "fanout") -> list[dict]:
    tree = _MCTS(s, cpuct, root_branches, lower_branches, rounds, rollout_action_temperature, value, expansion)
    tree.run()
    return tree.top()


# ----- the entry point --------------------------------------------------------------------------------------
def _check_temperature(name: str, value, zero_ok: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{name} must be a finite number {'>= 0' if zero_ok else '> 0'}, got {value!r}")


def _check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


@torch.no_grad()
def search(model, input_ids, attention_mask=None, *, tokenizer, reward, method: str = "mcts", budget: int,
           max_new_tokens: int = 24, seed: int | None = None, temperature: float = 0.0,
           reward_timeout: float | None = None, progress: Callable[[int, int], None] | None = None, **options):
    """Search over action sequences for the completion the reward scores highest.

    input_ids (seq,) or (batch, seq) left-padded, attention_mask (batch, seq) or None. One prompt -> a
    ``SearchResult``; a batch -> a list of them, one search per row with its own ``budget`` (rows do not share
    anything: a row's result is what it would be alone).

    tokenizer: decodes completions for the reward. reward: a callable ``reward(prompts, completions, **kw) ->
    list[float]`` (TRL's signature, as ``bwarea rl`` takes; ``kw`` has ``completion_ids``), a built-in task name
    (``keyword``, ``length``, ``sentiment``), ``'path/to/file.py:function'``, a list of these (summed), or a
    ``bwarea.rl.RewardSet``. method: ``mcts``, ``beam`` or ``best_of_n``. budget: world-model token evaluations
    (see the module docstring), at least ``max_new_tokens`` (the greedy sequence comes first). temperature: 0
    writes the world model's argmax token under each action; > 0 samples it at that temperature. seed: makes the
    search repeatable (None: torch's global generator). progress(spent, budget) is called as evaluations are spent.

    Method options: best_of_n ``n`` (default: as many as the budget pays for), ``action_temperature`` (default:
    the model's, config.action_temperature, as generate samples);
    beam ``beams`` (default: as many as the budget pays for), ``branches`` (4), ``value`` (a callable on the text,
    or ``"q"``: the learned Q(s, a) of each candidate's action), ``value_weight`` (1.0);
    mcts ``cpuct`` (0.7), ``root_branches`` (5), ``lower_branches`` (4), ``rounds`` (default: until the budget),
    ``rollout_action_temperature`` (1.0; 0 = greedy rollouts), ``value`` (a callable with the reward's signature
    scoring partial completions, or ``"q"``: the model's learned action-value head; either replaces rollouts),
    ``expansion`` (``"fanout"``: one fan-out per node, num_actions evaluations; ``"topk"``: only the kept
    branches' likeliest actions write a token, one evaluation each). An option the method does not take is an
    error; ``value="q"`` on a model without a value head is an error naming it.
    """
    from .rl.settings import DEFAULT_TIMEOUT

    if method not in METHODS:
        raise ValueError(f"unknown search method {method!r}: choose one of {', '.join(METHODS)}")
    unknown = sorted(set(options) - OPTIONS[method])
    if unknown:
        raise ValueError(f"search method {method!r} takes no option {', '.join(map(repr, unknown))} (it takes: "
                         f"{', '.join(sorted(OPTIONS[method]))})")
    _check_int("budget", budget)
    _check_int("max_new_tokens", max_new_tokens)
    _check_temperature("temperature", temperature, zero_ok=True)
    if seed is not None:
        _check_int("seed", seed, low=0)
    if budget < max_new_tokens:
        raise ValueError(f"budget {budget} is below max_new_tokens {max_new_tokens}: every search first writes the "
                         "policy's greedy sequence, so the budget must pay for at least that")
    if options.get("action_temperature") is not None:
        _check_temperature("best_of_n: action_temperature", options["action_temperature"], zero_ok=False)
    for name in ("n", "beams", "branches"):
        if options.get(name) is not None:
            _check_int(f"{method}: {name}", options[name])
    if "value_weight" in options:
        w = options["value_weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"beam: value_weight must be a finite number, got {w!r}")
    timeout = DEFAULT_TIMEOUT if reward_timeout is None else reward_timeout
    rewards = _as_reward_set(reward, "reward", timeout)
    values = options.get("value")
    if isinstance(values, str) and values == Q:
        if getattr(model.policy, "q_head", None) is None:
            raise ValueError(f"{method}: value='q' needs a model with a value head (config.value_head is false for "
                             "this one): train one with `bwarea rl --algo q`, or leave value out to use reward "
                             "rollouts")
    elif values is not None:
        values = _as_reward_set(values, "value", timeout)

    if not torch.is_tensor(input_ids):
        input_ids = torch.as_tensor(input_ids)
    single = input_ids.dim() == 1
    if single:
        input_ids = input_ids[None]
        attention_mask = None if attention_mask is None else torch.as_tensor(attention_mask).reshape(1, -1)
    model._check_inputs(input_ids, attention_mask)
    rows = []
    for r in range(input_ids.shape[0]):
        row = input_ids[r] if attention_mask is None else input_ids[r][attention_mask[r].bool()]
        if attention_mask is not None and not bool(attention_mask[r, -row.numel():].bool().all()):
            raise ValueError(f"attention_mask row {r} is not left-padded (a 0 follows a 1): pad on the left")
        if row.numel() == 0:
            raise ValueError(f"input_ids row {r} has no tokens")
        if row.numel() + max_new_tokens > model.config.max_position_embeddings:
            raise ValueError(f"prompt length {row.numel()} + max_new_tokens {max_new_tokens} exceeds the model's "
                             f"{model.config.max_position_embeddings} positions")
        rows.append(row.tolist())
    results = [_search_one(model, tokenizer, ids, rewards, values, method, budget, max_new_tokens, seed,
                           temperature, progress, options) for ids in rows]
    return results[0] if single else results


def _search_one(model, tokenizer, prompt_ids, rewards, values, method, budget, max_new_tokens, seed, temperature,
                progress, options) -> SearchResult:
    start = time.perf_counter()
    device = next(model.parameters()).device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    stats = SearchStats(budget=budget)
    s = _Search(model, tokenizer, prompt_ids, _Scorer(rewards, tokenizer, prompt), Budget(budget, progress),
                max_new_tokens, float(temperature), generator, stats)
    greedy = s.greedy()
    opts = dict(options)
    if values == Q:
        opts["value"] = Q
    elif values is not None:
        opts["value"] = _Scorer(values, tokenizer, prompt)
    run = {"best_of_n": _best_of_n, "beam": _beam, "mcts": _mcts}[method]
    top = run(s, **opts)
    best = s.best
    stats.evaluations = s.budget.spent
    stats.wall_time = time.perf_counter() - start
    return SearchResult(
        method=method, sequence=prompt_ids + list(best.tokens), completion_ids=list(best.tokens),
        completion=s.text(best.tokens), actions=list(best.actions), reward=best.reward,
        greedy_completion=s.text(greedy.tokens), greedy_actions=list(greedy.actions), greedy_reward=greedy.reward,
        stats=stats, top=top)
