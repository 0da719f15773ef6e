"""WebShop-style shopping (`--task webshop`): WebShop's text environment and reward over a synthetic catalog.

WebShop (Yao et al., 2022) needs its own server and a million scraped products; this is the same protocol over a
catalog drawn fresh per episode, in the spirit of the synthetic QA task: product ids, which products exist and what
they offer are random, so nothing can be memorized and every decision comes from the pages.

- A product has a type (shirt, bag, ...), two attributes (a material and a feature), buying options (colors and
  sizes) and a price; its title is `FEATURE MATERIAL TYPE`.
- An instruction is drawn from one product: `i need a lightweight cotton shirt with color red and size m , price
  lower than 40 dollars`. An episode has N of them (objectives, bought one after another: N = 1 is WebShop's episode;
  more make the episode longer, which is what MEM1's memory is for). The catalog holds, per instruction, the target,
  possibly a twin that lacks the wanted color or size (only its page tells), possibly a twin over the price bound,
  products that share two of the title's words, and fillers.
- Pages, in WebShop's text mode, each listing the actions available on it:
    search page   instruction, `search[...]`
    results page  `page P of Q`, per result `ID TITLE PRICE dollars`; click[back to search], click[< prev] (page > 1),
                  click[next >] (more pages), click[ID]
    item page     title, price, `color : ...`, `size : ...`; click[back to search], click[< prev] (to the results),
                  click[OPTION] (selects it; a second one of the same kind replaces it), click[buy now]
  Search is the project's BM25 over the titles, RESULTS_PER_PAGE results a page. As in WebShop an action that is not
  available does nothing: the page comes back, prefixed `invalid action .`. `click[buy now]` buys the product with
  the options selected and moves to the next instruction's search page; the episode ends after the N-th purchase.
- The agent writes its consolidated state in `<think>` and one action in `<answer>`, WebShop's syntax
  (`search[query]`, `click[element]`), as MEM1's WebShop agent does; a `<search>` tag is not an action here.
- Reward per purchase: WebShop's (`web_agent_site/engine/goal.py: get_reward`),
      r_type * (attributes matched + options matched + [price <= bound]) / (attributes + options + 1),
  r_type = 1 when the bought product's type is the instruction's, else 0 (titles here are type nouns plus
  adjectives, so WebShop's title-noun overlap is all or nothing), 0 for an instruction with no purchase. The episode's
  reward is the sum over its instructions (MEM1's sum over objectives); metrics: `score` (that sum) and `success`
  (purchases with score 1).
- The scripted expert (the warm start) searches the title's words, opens the first result whose title and price
  fit and that it has not opened yet, goes back when the page lacks a wanted option, selects color then size, and
  buys. Its state is the wanted options and the products it opened for the current instruction: `<think> need red m
  , opened b12 b07 </think>` (the opened ones are what no page shows; the options are copied every turn, so the
  copy is practised on every episode, hasty or not: with the options only in a careful episode's two clicks, the
  0.47M-parameter warm start did not learn to copy them and RL did not move it: README, "WebShop-style shopping").
  Its hasty variant (`shortcut`) browses as carefully but buys the first product it opens at once, selecting no
  option (score 3/5: what RL must teach is to pick the color and size, and to check the page for them).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from ..retrieval import BM25Retriever, Doc
from .base import Action, Reply, Score, compact_hint, register
from .synthetic import TAGS

TYPES = ("shirt", "pants", "shoes", "jacket", "hat", "dress", "socks", "bag")
MATERIALS = ("cotton", "wool", "leather", "silk", "linen", "denim", "nylon", "polyester")
FEATURES = ("waterproof", "lightweight", "vintage", "organic", "stretch", "quilted")
OPTIONS = {"color": ("red", "blue", "green", "black", "white", "gray", "pink", "brown"),
           "size": ("xs", "s", "m", "l", "xl")}
IDS = tuple(f"b{i:02d}" for i in range(100))
MAX_TURNS = 64
MAX_PRICE = 150  # prices and bounds are words 0..MAX_PRICE (the hint's numbers too)
RESULTS_PER_PAGE = 3
SEARCH_TOPK = 50  # results a search returns at most (WebShop: 50)
PAGE_WORDS = ("instruction", ":", ".", ",", ";", "i", "need", "a", "with", "color", "and", "size", "price", "lower",
              "than", "dollars", "page", "of", "actions", "search", "click", "[", "]", "...", "back", "to", "next",
              ">", "<", "prev", "buy", "now", "no", "results", "invalid", "action", "opened", "none", "HINT", "/HINT",
              "turns", "turn", "left")


def vocabulary() -> list[str]:
    words = [*TAGS, *PAGE_WORDS, *TYPES, *MATERIALS, *FEATURES, *OPTIONS["color"], *OPTIONS["size"], *IDS,
             *map(str, range(MAX_PRICE + 1))]
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class Product:
    id: str
    type: str
    attributes: tuple[str, str]  # (feature, material)
    options: dict  # option name -> offered values, in page order
    price: int

    @property
    def title(self) -> str:
        return f"{self.attributes[0]} {self.attributes[1]} {self.type}"


@dataclass(frozen=True)
class Goal:
    target: str  # the id of the product the instruction was drawn from
    type: str
    attributes: tuple[str, str]
    options: dict  # option name -> wanted value
    price_bound: int

    @property
    def instruction(self) -> str:
        return (f"i need a {self.attributes[0]} {self.attributes[1]} {self.type} with color {self.options['color']} "
                f"and size {self.options['size']} , price lower than {self.price_bound} dollars")


def purchase_score(product: Product, options: dict, goal: Goal) -> tuple[float, bool]:
    """WebShop's reward for buying `product` with the selected `options` (name -> value) against `goal`, and whether
    it is a success (everything matched). As WebShop counts options: each selected value that is one of the wanted
    values."""
    if product.type != goal.type:  # r_type = 0
        return 0.0, False
    attributes = sum(a in product.attributes for a in goal.attributes)
    chosen = sum(v in goal.options.values() for v in options.values())
    price = product.price <= goal.price_bound
    total = len(goal.attributes) + len(goal.options) + 1
    hits = attributes + chosen + price
    return hits / total, hits == total


def hint(turns_left: int) -> str:
    return compact_hint(turns_left, MAX_TURNS, "buy now")


_ACTION = re.compile(r"^(search|click)\s*\[(.*)\]$", re.S)
_TAG = re.compile(r"<(search|answer)>")


def parse_action(text: str) -> Action:
    """`<think> STATE </think> <answer> search[query] </answer>` or `... <answer> click[element] </answer>` ->
    Action(kind "search" or "click", content: the argument lowercased, whitespace collapsed). Never raises."""
    think, rest = "", text
    if "</think>" in text:
        head, rest = text.split("</think>", 1)
        think = head.split("<think>", 1)[-1].strip()
    elif "<think>" in text:
        return Action(None, "", "unclosed <think>: no </think> in the generation")
    tags = _TAG.findall(rest)
    if tags != ["answer"]:
        why = "no <answer> tag" if not tags else f"{len(tags)} action tags; exactly one <answer> is allowed" \
            if len(tags) > 1 else "the action goes inside <answer>, not <search>"
        return Action(None, "", why, think)
    start = rest.index("<answer>") + len("<answer>")
    end = rest.find("</answer>", start)
    if end < 0:
        return Action(None, "", "unclosed <answer>: no </answer>", think)
    body = rest[start:end].replace("&gt;", ">").replace("&lt;", "<").strip()
    m = _ACTION.match(body)
    if m is None:
        return Action(None, "", f"{body[:40]!r} is not search[...] or click[...]", think)
    return Action(m.group(1), " ".join(m.group(2).split()).lower(), None, think)


@dataclass
class ShopEpisode:
    """One episode: N instructions over one catalog (the task protocol of tasks/base.py)."""
    prompt: str
    goals: list[Goal]
    products: dict  # id -> Product
    retriever: BM25Retriever
    max_turns: int

    parse_action = staticmethod(parse_action)

    @property
    def n_objectives(self) -> int:
        return len(self.goals)

    def start(self) -> "ShopSession":
        return ShopSession(self)

    def search(self, query: str) -> list[Product]:
        hits = self.retriever.search([query], SEARCH_TOPK)[0]
        return [self.products[d.id] for d, _ in hits]


def search_page(goal: Goal) -> str:
    return f"instruction : {goal.instruction} . actions : search[...]"


@dataclass
class ShopSession:
    """One rollout's browser: the page it is on, the options selected, the purchases made."""
    episode: ShopEpisode
    page: str = "search"  # "search", "results" or "item"
    results: list = field(default_factory=list)  # the last search's products
    page_no: int = 1
    item: Product | None = None
    selected: dict = field(default_factory=dict)  # option name -> value, on the current item page
    purchases: list = field(default_factory=list)  # (product, options) per instruction bought so far
    invalid_actions: int = 0

    @property
    def goal(self) -> Goal:
        return self.episode.goals[len(self.purchases)]

    # -- pages: the text and the clickable elements of each ----------------------------------------------------
    def pages(self) -> int:
        return max(1, -(-len(self.results) // RESULTS_PER_PAGE))

    def shown(self) -> list[Product]:
        return self.results[(self.page_no - 1) * RESULTS_PER_PAGE:self.page_no * RESULTS_PER_PAGE]

    def clickables(self) -> list[str]:
        if self.page == "search":
            return []
        out = ["back to search"]
        if self.page == "results":
            out += ["< prev"] if self.page_no > 1 else []
            out += ["next >"] if self.page_no < self.pages() else []
            return out + [p.id for p in self.shown()]
        return out + ["< prev"] + [v for vs in self.item.options.values() for v in vs] + ["buy now"]

    def render(self) -> str:
        if self.page == "search":
            return search_page(self.goal)
        head = f"instruction : {self.goal.instruction} ."
        if self.page == "results":
            if not self.results:
                body = "no results ."
            else:
                body = f"page {self.page_no} of {self.pages()} : " + " ; ".join(
                    f"{p.id} {p.title} {p.price} dollars" for p in self.shown()) + " ."
        else:
            p = self.item
            body = f"{p.id} {p.title} . price : {p.price} dollars . " + " ".join(
                f"{name} : {' '.join(vs)} ." for name, vs in p.options.items())
        actions = " ".join(f"click[{c}]" for c in self.clickables())
        return f"{head} {body} actions : {actions}"

    def observation(self, turns_left: int, note: str = "") -> str:
        parts = ["<information>", hint(turns_left), note, self.render(), "</information>"]
        return " ".join(p for p in parts if p)

    # -- the protocol --------------------------------------------------------------------------------------------
    def step(self, action: Action, turns_left: int) -> Reply:
        if action.kind == "click" and action.content == "buy now" and self.page == "item":
            self.purchases.append((self.item, dict(self.selected)))
            if len(self.purchases) == len(self.episode.goals):
                return Reply(None, done=True, finish="purchase")
            self.page, self.item, self.selected, self.results = "search", None, {}, []
        elif turns_left == 0:  # nothing but a purchase can matter on the last turn
            return Reply(None, finish=f"turn budget spent after {len(self.purchases)} purchases")
        elif not self.act(action):
            self.invalid_actions += 1
            return Reply(self.observation(turns_left, "invalid action ."))
        return Reply(self.observation(turns_left))

    def act(self, action: Action) -> bool:
        """Apply an action other than buying; False (and nothing changes) when it is not available here."""
        if action.kind == "search":
            if self.page != "search" or not action.content or action.content == "...":
                return False
            self.page, self.results, self.page_no = "results", self.episode.search(action.content), 1
            return True
        c = action.content
        if c not in self.clickables():
            return False
        if c == "back to search":
            self.page, self.item, self.selected, self.results = "search", None, {}, []
        elif c == "< prev" and self.page == "item":
            self.page, self.item, self.selected = "results", None, {}
        elif c == "< prev":
            self.page_no -= 1
        elif c == "next >":
            self.page_no += 1
        elif self.page == "results":
            self.page, self.item, self.selected = "item", self.episode.products[c], {}
        else:  # an option of the item
            name = next(n for n, vs in self.item.options.items() if c in vs)
            self.selected[name] = c
        return True

    def error_observation(self, message: str, turns_left: int) -> str:
        return self.observation(turns_left, "search failed .")

    def score(self) -> Score:
        per, success = [], 0
        for k, goal in enumerate(self.episode.goals):
            if k < len(self.purchases):
                s, ok = purchase_score(*self.purchases[k], goal)
                per.append(s)
                success += ok
            else:
                per.append(0.0)
        return Score(sum(per), per, {"score": sum(per), "success": float(success)})


class ShopTask:
    """The task protocol's generated task (tasks/base.py): N instructions over a catalog drawn per episode. The
    turn budget is the expert's turns plus a slack drawn per episode (an int, or an inclusive range capped at
    MAX_TURNS - the expert's turns)."""

    MAX_TURNS = MAX_TURNS
    PUNCTUATION = "[]"
    # the trainer's defaults under --task webshop (README, "WebShop-style shopping"): one or two purchases per
    # training episode; no position jitter (with the synthetic task's 64 the warm start's loss stalled near 0.33
    # after 800 steps, against 0.08 without); more, smaller SFT steps (1600 x 16 episodes: the copy lookups form
    # after ~800 updates); each episode's loss a mean over its tokens (under token-mean the long, many-purchase
    # episodes outweighed the short ones and the score fell during RL)
    RECIPE = dict(n_max=2, eval_objectives="1,2,4", sft_position_jitter=0, sft_batch=16, sft_steps=1600,
                  loss_agg="seq-mean-token-mean")
    vocabulary = staticmethod(vocabulary)

    def __init__(self, seed: int = 0, n_range: tuple[int, int] = (1, 1), slack: int | tuple[int, int] = 2,
                 fillers: int = 8, p_option_twin: float = 0.7, p_price_twin: float = 0.5):
        lo, hi = n_range
        if not 1 <= lo <= hi or hi > len(TYPES):
            raise ValueError(f"n_range {n_range} must satisfy 1 <= lo <= hi <= {len(TYPES)} (one product type per "
                             "instruction)")
        slack_lo, slack_hi = (slack, slack) if isinstance(slack, int) else slack
        if 7 * hi + slack_lo > MAX_TURNS or not 1 <= slack_lo <= slack_hi:
            raise ValueError(f"slack {slack} at N = {hi}: up to 7N + slack turns, which must be in 7N+1..{MAX_TURNS}")
        self.rng, self.n_range, self.slack = random.Random(seed), (lo, hi), (slack_lo, slack_hi)
        self.fillers, self.p_option_twin, self.p_price_twin = fillers, p_option_twin, p_price_twin

    def sample(self, rng: random.Random | None = None, n: int | None = None) -> ShopEpisode:
        rng = rng or self.rng
        n = rng.randint(*self.n_range) if n is None else n
        ids = iter(rng.sample(IDS, len(IDS)))
        products, goals = [], []

        def product(type_, attrs, price, want=None, lacking=None):
            opts = {}
            for name, values in OPTIONS.items():
                pool = [v for v in values if v != (want or {}).get(name) and v != (lacking or {}).get(name)]
                vs = rng.sample(pool, rng.randint(1, 2))
                if want and name not in (lacking or {}):
                    vs.insert(rng.randrange(len(vs) + 1), want[name])
                opts[name] = tuple(vs)
            p = Product(next(ids), type_, attrs, opts, price)
            products.append(p)
            return p

        def price_below(bound):
            return rng.choice([p for p in range(max(11, bound - 30), bound) if p % 10])

        types = rng.sample(TYPES, n)
        titles = set()
        for t in types:
            attrs = (rng.choice(FEATURES), rng.choice(MATERIALS))
            titles.add((t, attrs))
            bound = 10 * rng.randint(3, 12)
            want = {name: rng.choice(values) for name, values in OPTIONS.items()}
            target = product(t, attrs, price_below(bound), want)
            goals.append(Goal(target.id, t, attrs, want, bound))
            if rng.random() < self.p_option_twin:  # lacks the wanted color, the size, or both
                lacking = rng.choice([{"color": want["color"]}, {"size": want["size"]}, dict(want)])
                product(t, attrs, price_below(bound), want, lacking)
            if rng.random() < self.p_price_twin:
                product(t, attrs, rng.choice([p for p in range(bound + 1, min(MAX_PRICE, bound + 40)) if p % 10]),
                        want)
            for _ in range(2):  # two of the title's three words
                other = (rng.choice([f for f in FEATURES if f != attrs[0]]), attrs[1]) if rng.random() < 0.5 else \
                    (attrs[0], rng.choice([m for m in MATERIALS if m != attrs[1]]))
                product(t, other, rng.randint(11, 99), want if rng.random() < 0.5 else None)
        for _ in range(self.fillers):
            while True:
                t, attrs = rng.choice(TYPES), (rng.choice(FEATURES), rng.choice(MATERIALS))
                if (t, attrs) not in titles:
                    break
            product(t, attrs, rng.randint(11, 99))
        rng.shuffle(products)  # corpus order breaks BM25 ties: keep it uninformative
        docs = [Doc(p.id, f'"{p.id}"\n{p.title}') for p in products]
        ep = ShopEpisode(f"<information> {search_page(goals[0])} </information>", goals, {p.id: p for p in products},
                         BM25Retriever(docs, stopwords=None), max_turns=0)
        turns = len(expert_trajectory(ep, budget=MAX_TURNS))
        slack = rng.randint(self.slack[0], max(self.slack[0], min(self.slack[1], MAX_TURNS - turns)))
        ep.max_turns = turns + slack
        return ep

    @staticmethod
    def expert_trajectory(episode, shortcut: float = 0.0, rng: random.Random | None = None):
        return expert_trajectory(episode, shortcut, rng)


def expert_turn(session: ShopSession, opened: list[str], hasty: bool) -> tuple[str, str]:
    """The expert's (state, action) on the session's current page. `opened`: products opened for the current
    instruction (its memory, updated here); `hasty`: buy the first product opened, selecting nothing."""
    goal = session.goal
    need = f"need {goal.options['color']} {goal.options['size']} , opened "
    if session.page == "search":
        opened.clear()
        return need + "none", f"search[{goal.attributes[0]} {goal.attributes[1]} {goal.type}]"
    state = need + (" ".join(opened) or "none")
    if session.page == "results":
        for p in session.shown():
            fits = p.type == goal.type and p.attributes == goal.attributes and p.price <= goal.price_bound
            if fits and p.id not in opened:
                opened.append(p.id)
                return state, f"click[{p.id}]"
        return state, "click[next >]" if "next >" in session.clickables() else "click[back to search]"
    item = session.item
    if hasty:
        return state, "click[buy now]"
    if not all(v in item.options[name] for name, v in goal.options.items()):
        return state, "click[< prev]"
    for name in OPTIONS:  # color, then size: those of the wanted ones the page offers
        want = goal.options[name]
        if want in item.options[name] and session.selected.get(name) != want:
            return state, f"click[{want}]"
    return state, "click[buy now]"


def expert_trajectory(episode: ShopEpisode, shortcut: float = 0.0, rng: random.Random | None = None,
                      budget: int | None = None) -> list[tuple[str, str]]:
    """(generation, observation) per turn, as the agent loop would produce them against a fresh session, with
    MEM1's hint rule (turns_left = max_turns - turn - 1); '' after the last purchase. `shortcut`: for each
    instruction, with that probability, the expert is hasty: it buys the first product it opens (whose title and
    price fit) at once, without selecting its color and size and without checking that it offers them."""
    if shortcut and rng is None:
        raise ValueError("a hasty expert (shortcut > 0) needs an rng")
    budget = budget or episode.max_turns
    session, opened, out, hasty = episode.start(), [], [], False
    for turn in range(budget):
        if session.page == "search":  # a new instruction
            hasty = bool(shortcut) and rng.random() < shortcut
        state, act_text = expert_turn(session, opened, hasty)
        gen = f"<think> {state} </think> <answer> {act_text} </answer>"
        action = parse_action(gen)
        reply = session.step(action, budget - turn - 1)
        if reply.done:
            return out + [(gen, "")]
        if reply.observation is None:
            break
        out.append((gen, reply.observation))
    raise ValueError(f"the expert did not finish {episode.n_objectives} purchases within {budget} turns")


register("webshop", ShopTask)
