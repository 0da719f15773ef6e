"""The WebShop-style environment (mem1_fast/tasks/webshop.py): WebShop's reward on constructed purchases against
hand-computed values, the pages and their actions (paging, back navigation, invalid actions), the action parser,
the scripted expert, the tokenizer, and rollouts through the agent loop (independent sessions within a group)."""
import random

import pytest

from mem1_fast.retrieval import BM25Retriever, Doc
from mem1_fast.rollout import AgentConfig, Generation, KVStats, run_episodes
from mem1_fast.tasks import webshop as ws
from mem1_fast.tiny import word_tokenizer

COLOR, SIZE = {"color": ("red", "blue"), "size": ("s", "m")}, None


def P(id_, title, price, colors=("red", "blue"), sizes=("s", "m")):
    feature, material, type_ = title.split()
    return ws.Product(id_, type_, (feature, material), {"color": tuple(colors), "size": tuple(sizes)}, price)


GOAL = ws.Goal("b01", "shirt", ("lightweight", "cotton"), {"color": "red", "size": "m"}, 40)
PRODUCTS = [P("b01", "lightweight cotton shirt", 25),
            P("b02", "lightweight cotton shirt", 45),  # over the bound
            P("b03", "vintage cotton shirt", 20),  # one attribute wrong
            P("b04", "lightweight cotton hat", 15),  # another type
            P("b05", "lightweight cotton shirt", 30, colors=("blue",)),  # lacks the color
            P("b06", "lightweight wool shirt", 12),
            P("b07", "organic silk dress", 33)]


def episode(products=PRODUCTS, goals=(GOAL,), max_turns=30):
    docs = [Doc(p.id, f'"{p.id}"\n{p.title}') for p in products]
    return ws.ShopEpisode("<information> start </information>", list(goals), {p.id: p for p in products},
                          BM25Retriever(docs, stopwords=None), max_turns)


def act(session, text, turns_left=10):
    action = ws.parse_action(f"<think> x </think> <answer> {text} </answer>")
    assert action.kind is not None, action.error
    return session.step(action, turns_left)


def buy(products, option_clicks, goal=GOAL):
    """Buy products[0] after clicking `option_clicks` on its page; the session's score."""
    s = episode(products, (goal,)).start()
    s.page, s.results, s.item = "item", list(products), products[0]
    for c in option_clicks:
        assert "invalid" not in act(s, f"click[{c}]").observation
    assert act(s, "click[buy now]").done
    return s.score()


# ------------------------------------------------------------------------------------------------ the reward

@pytest.mark.parametrize("product,clicks,expected", [
    # WebShop: r_type * (attributes + options + [price <= bound]) / (2 attributes + 2 options + 1)
    (0, ("red", "m"), 5 / 5),  # the target, right options
    (0, (), 3 / 5),  # the target, no option selected (the hasty buyer)
    (0, ("blue", "m"), 4 / 5),  # a wrong color
    (0, ("red", "s"), 4 / 5),  # a wrong size
    (0, ("blue", "s"), 3 / 5),  # both wrong
    (0, ("blue", "red", "m"), 5 / 5),  # a second color replaces the first
    (1, ("red", "m"), 4 / 5),  # over the price bound
    (2, ("red", "m"), 4 / 5),  # one attribute missing
    (5, ("red", "m"), 4 / 5),  # the other attribute missing
    (4, ("blue", "m"), 4 / 5),  # the twin without the wanted color: the size matches only
    (3, ("red", "m"), 0.0),  # another product type: r_type = 0
])
def test_purchase_reward_matches_hand_computed_values(product, clicks, expected):
    order = [PRODUCTS[product]] + [p for p in PRODUCTS if p is not PRODUCTS[product]]
    score = buy(order, clicks)
    assert score.reward == pytest.approx(expected) and score.per_objective == [pytest.approx(expected)]
    assert score.metrics == {"score": pytest.approx(expected), "success": float(expected == 1.0)}


def test_purchase_score_function_directly():
    # independent of the pages: the formula on its own, including WebShop's counting of options by value
    target = PRODUCTS[0]
    assert ws.purchase_score(target, {"color": "red", "size": "m"}, GOAL) == (1.0, True)
    assert ws.purchase_score(target, {"size": "m"}, GOAL) == (pytest.approx(0.8), False)
    cheap = ws.Goal("b01", "shirt", ("lightweight", "cotton"), {"color": "red", "size": "m"}, 20)
    assert ws.purchase_score(target, {"color": "red", "size": "m"}, cheap) == (pytest.approx(0.8), False)
    hat = ws.Goal("b04", "hat", ("lightweight", "cotton"), {"color": "red", "size": "m"}, 40)
    assert ws.purchase_score(target, {"color": "red", "size": "m"}, hat) == (0.0, False)


def test_no_purchase_scores_zero_and_purchases_are_per_instruction():
    goal2 = ws.Goal("b07", "dress", ("organic", "silk"), {"color": "red", "size": "s"}, 40)
    ep = episode(goals=(GOAL, goal2))
    s = ep.start()
    assert s.score().reward == 0.0 and s.score().per_objective == [0.0, 0.0]
    act(s, "search[lightweight cotton shirt]")
    act(s, f"click[{s.shown()[0].id}]")
    first = s.item
    r = act(s, "click[buy now]")  # bought without options: the next instruction's search page
    assert not r.done and goal2.instruction in r.observation and "search[...]" in r.observation
    want = ws.purchase_score(first, {}, GOAL)[0]
    assert s.score().per_objective == [pytest.approx(want), 0.0]
    act(s, "search[organic silk dress]")
    act(s, "click[b07]")
    act(s, "click[red]")
    act(s, "click[s]")
    assert act(s, "click[buy now]").done
    assert s.score().per_objective == [pytest.approx(want), 1.0] and s.score().metrics["success"] == 1.0 + (want == 1)


# ------------------------------------------------------------------------------------------------ pages

def test_paging_and_back_navigation():
    s = episode().start()
    r = act(s, "search[lightweight cotton shirt]")
    hits = s.results
    assert len(hits) == 7 - 1  # every product sharing a title word but the dress; 3 a page
    assert "page 1 of 2" in r.observation and "click[next >]" in r.observation and "click[< prev]" not in r.observation
    page1 = [p.id for p in hits[:3]]
    assert all(f"click[{i}]" in r.observation for i in page1)
    r = act(s, "click[next >]")
    assert "page 2 of 2" in r.observation and "click[next >]" not in r.observation and "click[< prev]" in r.observation
    assert [p.id for p in s.shown()] == [p.id for p in hits[3:]]
    r = act(s, "click[next >]")  # no page 3
    assert r.observation.startswith("<information> [HINT] 10 turns left [/HINT] invalid action .")
    assert s.page_no == 2 and s.invalid_actions == 1
    item = hits[3].id
    r = act(s, f"click[{item}]")
    assert s.page == "item" and f"{item} {hits[3].title} . price : {hits[3].price} dollars" in r.observation
    assert "click[buy now]" in r.observation and "click[< prev]" in r.observation
    act(s, "click[red]")
    r = act(s, "click[< prev]")  # back to the results page it came from, selections dropped
    assert s.page == "results" and s.page_no == 2 and "page 2 of 2" in r.observation and s.selected == {}
    act(s, "click[< prev]")
    assert s.page_no == 1
    r = act(s, "click[back to search]")
    assert s.page == "search" and "actions : search[...]" in r.observation and s.results == []
    r = act(s, "search[organic]")
    assert "page 1 of 1 : b07 organic silk dress 33 dollars ." in r.observation
    r = act(s, "click[b07]")
    r = act(s, "click[back to search]")  # from an item page too
    assert s.page == "search" and s.item is None


def test_observation_lists_the_available_actions():
    s = episode().start()
    act(s, "search[lightweight cotton shirt]")
    act(s, f"click[{s.shown()[0].id}]")
    r = act(s, "click[red]", turns_left=1)
    assert r.observation.startswith("<information> [HINT] 1 turn left , buy now [/HINT] instruction : i need a")
    actions = r.observation.split("actions : ")[1].removesuffix(" </information>").split()
    options = [f"click[{v}]" for v in ("red", "blue", "s", "m")]
    assert actions == ["click[back", "to", "search]", "click[<", "prev]", *options, "click[buy", "now]"]


@pytest.mark.parametrize("page,action", [
    ("search", "click[b01]"),  # nothing to click on the search page
    ("search", "search[...]"),  # the placeholder is not a query
    ("search", "click[buy now]"),
    ("results", "search[shirt]"),  # only the search page has a search bar
    ("results", "click[b07]"),  # not on this page
    ("results", "click[buy now]"),
    ("results", "click[red]"),
    ("item", "click[pink]"),  # an option the product does not offer
    ("item", "click[b02]"),  # a result, but we are on an item page
    ("item", "click[next >]"),
])
def test_invalid_actions_change_nothing(page, action):
    s = episode().start()
    if page != "search":
        act(s, "search[lightweight cotton shirt]")
    if page == "item":
        act(s, "click[b01]")
        act(s, "click[red]")
    before = (s.page, s.page_no, s.item, dict(s.selected), len(s.purchases), s.render())
    r = act(s, action)
    assert not r.done and r.observation.startswith("<information> [HINT] 10 turns left [/HINT] invalid action . ")
    assert (s.page, s.page_no, s.item, dict(s.selected), len(s.purchases), s.render()) == before
    assert r.observation.endswith(before[-1] + " </information>") and s.invalid_actions == 1


def test_last_turn_only_a_purchase_counts_and_no_results():
    s = episode().start()
    r = act(s, "search[lightweight cotton shirt]", turns_left=0)  # nobody could read its results
    assert r.observation is None and not r.done and r.finish == "turn budget spent after 0 purchases"
    assert s.page == "search"
    r = act(s, "search[zzz qqq]")
    assert "no results . actions : click[back to search]" in r.observation
    s = episode().start()
    act(s, "search[lightweight cotton shirt]")
    act(s, "click[b01]")
    assert act(s, "click[buy now]", turns_left=0).done  # the purchase on the last turn is made


# ------------------------------------------------------------------------------------------------ parsing

@pytest.mark.parametrize("text,kind,content", [
    ("<think> opened b01 </think> <answer> click[b01] </answer>", "click", "b01"),
    ("<think> x </think> <answer> click [ b01 ] </answer>", "click", "b01"),  # the word tokenizer's decoding
    ("<think>x</think><answer>search[Red  Cotton\nShirt]</answer>", "search", "red cotton shirt"),
    ("<think> x </think> <answer> click[next &gt;] </answer>", "click", "next >"),  # MEM1 unescapes &gt;
    ("<think> x </think> <answer> click [ < prev ] </answer>", "click", "< prev"),
])
def test_parse_action(text, kind, content):
    a = ws.parse_action(text)
    assert (a.kind, a.content, a.error) == (kind, content, None)


@pytest.mark.parametrize("text,error", [
    ("<think> x </think> click[b01]", "no <answer>"),
    ("<think> x </think> <search> shirt </search>", "not <search>"),
    ("<think> x </think> <answer> buy[b01] </answer>", "is not search[...] or click[...]"),
    ("<think> x </think> <answer> click[b01] </answer> <answer> click[b02] </answer>", "exactly one"),
    ("<think> x <answer> click[b01] </answer>", "unclosed <think>"),
    ("<think> x </think> <answer> click[b01]", "unclosed <answer>"),
])
def test_parse_action_rejects(text, error):
    a = ws.parse_action(text)
    assert a.kind is None and error in a.error


# ------------------------------------------------------------------------------------------------ task, expert

def test_catalogs_and_the_expert():
    task = ws.ShopTask(seed=3, n_range=(1, 3))
    rng, turns, reopened, twins = random.Random(0), [], 0, 0
    for _ in range(150):
        ep = task.sample(rng)
        for g in ep.goals:  # exactly one product in the catalog satisfies everything
            fits = [p for p in ep.products.values() if ws.purchase_score(p, dict(g.options), g)[1]
                    and all(v in p.options[k] for k, v in g.options.items())]
            assert [p.id for p in fits] == [g.target]
            twins += sum(p.type == g.type and p.attributes == g.attributes for p in ep.products.values()) - 1
        traj = ws.expert_trajectory(ep)
        turns.append(len(traj))
        assert len(traj) + 2 <= ep.max_turns <= ws.MAX_TURNS and traj[-1][1] == ""
        s = ep.start()
        for j, (gen, obs) in enumerate(traj):  # replaying the generations reproduces the observations
            r = s.step(ws.parse_action(gen), ep.max_turns - j - 1)
            assert (r.observation or "") == obs and "invalid" not in obs
        assert s.score().per_objective == [1.0] * ep.n_objectives and s.score().metrics["success"] == ep.n_objectives
        reopened += sum("< prev" in g for g, _ in traj)
        assert [g.target for g in ep.goals] == [p.id for p, _ in s.purchases]
    assert reopened > 20 and twins > 150  # the expert had to go back, and decoys were there
    assert min(turns) == 5 and max(turns) >= 15


@pytest.mark.parametrize("shortcut", [0.0, 1.0])
def test_expert_state_is_the_wanted_options_and_the_products_opened(shortcut):
    """Each turn's state names the current instruction's color and size and the products opened for it so far, in
    order (recomputed here from the pages the generations led to, not from the expert's own list)."""
    task, rng, longest = ws.ShopTask(seed=7, n_range=(1, 3)), random.Random(2), 0
    for _ in range(40):
        ep = task.sample(rng)
        s, opened = ep.start(), []
        for j, (gen, _) in enumerate(ws.expert_trajectory(ep, shortcut, rng)):
            goal, action = s.goal, ws.parse_action(gen)
            if s.page == "search":
                opened = []
            want = f"need {goal.options['color']} {goal.options['size']} , opened {' '.join(opened) or 'none'}"
            assert action.think == want, (j, gen)
            s.step(action, ep.max_turns - j - 1)
            if s.page == "item" and s.item.id not in opened:
                opened.append(s.item.id)
            longest = max(longest, len(opened))
    assert longest == (1 if shortcut else 2)  # the careful expert went back and opened a second product


def test_hasty_expert_buys_without_options():
    """shortcut 1: every instruction buys the first fitting product opened, at once, with no option selected (score
    3/5, checked against purchase_score's formula by hand); shortcut 0.6: that for about 60% of the instructions, the
    careful expert (the target, its wanted options) for the others."""
    task = ws.ShopTask(seed=5, n_range=(2, 2))
    eps = [task.sample(random.Random(i)) for i in range(150)]
    rng, hasty, careful_buys = random.Random(1), 0, 0
    for k, ep in enumerate(eps):
        shortcut = 1.0 if k < 30 else 0.6
        traj = ws.expert_trajectory(ep, shortcut, rng)
        s = ep.start()
        for j, (gen, obs) in enumerate(traj):
            s.step(ws.parse_action(gen), ep.max_turns - j - 1)
            assert "invalid" not in obs
        assert len(s.purchases) == 2
        for (bought, options), goal in zip(s.purchases, ep.goals):
            assert bought.type == goal.type and bought.attributes == goal.attributes
            assert bought.price <= goal.price_bound  # the results page was still checked
            if k < 30:
                assert options == {} and ws.purchase_score(bought, options, goal) == (0.6, False)
            elif options == {}:
                hasty += 1
            else:
                careful_buys += 1
                assert bought.id == goal.target and options == goal.options
        if k < 30:
            assert "< prev" not in " ".join(g for g, _ in traj)
    n = 2 * 120
    assert 0.5 * n < hasty < 0.7 * n and hasty + careful_buys == n
    careful = ws.expert_trajectory(eps[0], 0.0)
    assert careful == ws.expert_trajectory(eps[0]) and "< prev" in " ".join(
        g for ep in eps[:40] for g, _ in ws.expert_trajectory(ep))
    with pytest.raises(ValueError, match="rng"):
        ws.expert_trajectory(eps[0], 0.5)


def test_bad_task_options():
    with pytest.raises(ValueError, match="n_range"):
        ws.ShopTask(n_range=(1, 9))
    with pytest.raises(ValueError, match="slack"):
        ws.ShopTask(n_range=(1, 8), slack=10)


def test_tokenizer_covers_the_task_and_splits_brackets():
    tok = word_tokenizer(ws.vocabulary(), ws.ShopTask.PUNCTUATION)
    ep = ws.ShopTask(seed=0, n_range=(2, 2)).sample(random.Random(0))
    for gen, obs in ws.expert_trajectory(ep, 0.5, random.Random(0)):
        for text in (gen, obs, ep.prompt):
            ids = tok.encode(text, add_special_tokens=False)
            assert tok.unk_token_id not in ids, text
            assert tok.decode(ids).split() == text.replace("[", " [ ").replace("]", " ] ").split()
        # what the model generates decodes to the same action
        assert ws.parse_action(tok.decode(tok.encode(gen, add_special_tokens=False))) == ws.parse_action(gen)
    assert tok.tokenize("click[b07]") == ["click", "[", "b07", "]"]
    plain = word_tokenizer(ws.vocabulary())  # negative control: without the split, the action is one unknown word
    assert plain.encode("click[b07]", add_special_tokens=False) == [plain.unk_token_id]


# ------------------------------------------------------------------------------------------------ agent loop

class ScriptedEngine:
    def __init__(self, tok, scripts):
        self.tok, self.scripts = tok, scripts

    def start(self, prompts, greedy=None, seed=None):
        self.turn = [0] * len(prompts)

    def step(self, idx, observations=None):
        out = []
        for i in idx:
            ids = self.tok.encode(self.scripts[i][self.turn[i]], add_special_tokens=False)
            self.turn[i] += 1
            out.append(Generation(ids, [-0.1] * len(ids), "stop"))
        return out

    def kv_stats(self, i):
        return KVStats()


def test_a_group_shares_the_episode_but_not_the_session():
    """Rollouts of one episode object (as RL repeats it group_size times) each get their own browser: one buys
    with the options, one without, one never buys, one writes a malformed turn."""
    tok = word_tokenizer(ws.vocabulary(), ws.ShopTask.PUNCTUATION)
    ep = episode(max_turns=6)
    g = lambda a: f"<think> opened none </think> <answer> {a} </answer>"  # noqa: E731
    full = [g("search[lightweight cotton shirt]"), g("click[b01]"), g("click[red]"), g("click[m]"), g("click[buy now]")]
    hasty = full[:2] + [g("click[buy now]")]
    never = full[:2] + [g("click[red]")] * 4
    broken = full[:1] + ["<think> x </think> nothing"]
    trajs = run_episodes(ScriptedEngine(tok, [full, hasty, never, broken]), tok, [ep] * 4, AgentConfig())
    assert [t.reward for t in trajs] == [1.0, pytest.approx(0.6), 0.0, 0.0]
    assert [t.info.turns for t in trajs] == [5, 3, 6, 2]
    assert [t.info.answered for t in trajs] == [True, True, False, False]
    assert trajs[0].info.finish == "purchase" and trajs[2].info.finish == "turn budget spent after 0 purchases"
    assert not trajs[3].info.valid and "no <answer>" in trajs[3].info.finish
    assert [t.info.searches for t in trajs] == [1, 1, 1, 1]
    assert trajs[0].info.metrics == {"score": 1.0, "success": 1.0}
