"""A small labelled corpus and retrieval metrics, shared by tests/test_rag_quality.py and bench/bench_rag.py.

Why one module for both: the choice of the default search mode (hybrid or vector)
rests on this measurement, so the tests (which guard the choice) and the
benchmark (which reports it) must use the same documents and questions.
Questions are phrased differently from the documents on purpose; a few
name an exact code or product term, where keyword search helps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.store.rag import RagStore, SearchMode

CORPUS: dict[str, str] = {
    "sourdough.md": (
        "# Baking sourdough bread\n\n"
        "A sourdough starter is a culture of wild yeast and lactic acid bacteria kept alive by feeding it flour and "
        "water every day. Before baking, feed the starter and wait until it has doubled. Mix flour, water and salt, "
        "then fold the dough every half hour for the first two hours of bulk fermentation. Shape the loaf, let it "
        "proof overnight in the fridge, and bake it in a preheated Dutch oven at 250 °C, lid on for twenty minutes "
        "and off for twenty more, until the crust is deep brown."
    ),
    "solar.md": (
        "# Rooftop solar panels\n\n"
        "Photovoltaic panels turn sunlight into direct current; an inverter converts it to alternating current for "
        "the house. A south-facing roof at a tilt close to the latitude yields the most energy. Shade from a single "
        "chimney can cut the output of a whole string unless each panel has a micro-inverter or an optimiser. A "
        "battery stores midday surplus for the evening, and net metering lets the utility credit exported power."
    ),
    "marathon.md": (
        "# Preparing for a marathon\n\n"
        "Most plans last sixteen to twenty weeks. Build weekly mileage by no more than ten percent, with one long "
        "slow run each weekend that grows to about 32 kilometres. Taper for the last three weeks so the legs are "
        "fresh on race day. During the race, take carbohydrate gels every forty-five minutes and drink at the aid "
        "stations to avoid hitting the wall."
    ),
    "houseplants.md": (
        "# Keeping houseplants alive\n\n"
        "Overwatering kills more indoor plants than drought: water only when the top two centimetres of soil are "
        "dry, and use pots with drainage holes. Yellow lower leaves usually mean soggy roots. Most tropical "
        "foliage plants like bright, indirect light; a north window suits ferns and pothos. Feed them with diluted "
        "fertiliser in spring and summer and repot when roots circle the bottom of the pot."
    ),
    "router.md": (
        "# Securing a home Wi-Fi router\n\n"
        "Change the default admin password first and update the firmware. Choose WPA3-Personal encryption, or "
        "WPA2-AES when older devices cannot join, and turn off WPS because its PIN can be brute-forced. On the "
        "2.4 GHz band, pick channel 1, 6 or 11 to avoid overlapping neighbours; the 5 GHz band is faster but has "
        "a shorter range through walls. A guest network keeps visitors away from your own devices."
    ),
    "mosquitto.md": (
        "# Mosquitto configuration reference\n\n"
        "## allow_anonymous\n\nWhen false, a client that connects without a username is refused. Set it to false "
        "on every listener that is reachable from the network.\n\n"
        "## acl_file\n\nPath of the access-control list. The line 'pattern write slb/v1/agent/%u/#' lets each "
        "client publish only under its own username.\n\n"
        "## password_file\n\nPath of the file of users and hashed passwords, written with the mosquitto_passwd "
        "tool.\n\n"
        "## persistence_location\n\nDirectory where the broker saves retained messages and durable sessions "
        "when persistence is true, so they survive a restart.\n\n"
        "## max_queued_messages\n\nHow many QoS 1 and 2 messages are kept for a disconnected client before "
        "new ones are dropped; 0 means no limit.\n\n"
        "## keepalive_interval\n\nSeconds between pings a bridge sends to the remote broker to notice a dead "
        "connection.\n\n"
        "## log_dest\n\nWhere log lines go: stdout, stderr, syslog, or a file given by path.\n"
    ),
    "compost.md": (
        "# Making garden compost\n\n"
        "Mix green material such as grass clippings and vegetable scraps with brown material such as dry leaves "
        "and cardboard, roughly one part green to three parts brown. Keep the heap as damp as a wrung-out sponge "
        "and turn it every week or two to let air in. A hot pile reaches 60 °C and kills weed seeds; finished "
        "compost is dark, crumbly and smells of earth after three to six months."
    ),
    "burns.md": (
        "# First aid for burns\n\n"
        "Cool a burn under cool running water for twenty minutes as soon as possible; do not use ice, butter or "
        "toothpaste. Remove rings and tight clothing before swelling starts. Cover the area loosely with cling "
        "film or a clean non-fluffy dressing. Seek emergency care for burns larger than the casualty's hand, for "
        "burns on the face, hands or genitals, and for any chemical or electrical burn."
    ),
    "espresso.md": (
        "# Pulling a good espresso\n\n"
        "Use about 18 grams of finely ground coffee and aim for roughly 36 grams of liquid in 25 to 30 seconds. "
        "If the shot runs too fast and tastes sour, grind finer; if it drips slowly and tastes bitter, grind "
        "coarser. Tamp evenly, preheat the portafilter and cup, and use beans roasted within the last month for "
        "a thick crema."
    ),
    "dishwasher.md": (
        "# Dishwasher error codes\n\n"
        "## E1047\n\nThe drain pump is blocked. Clean the filter at the bottom of the tub.\n\n"
        "## E1074\n\nThe drain hose is kinked or the sink trap is clogged. Straighten the hose.\n\n"
        "## E2201\n\nThe water is not hot enough. Check that the heating element gets power.\n\n"
        "## E2210\n\nThe water inlet valve did not open within ten minutes. Make sure the tap is on.\n\n"
        "## E3301\n\nThe heating element failed. Call a technician.\n\n"
        "## E3310\n\nThe temperature sensor reads out of range. Call a technician.\n\n"
        "## Reset\n\nAfter fixing the cause, hold the start button for three seconds to clear the code.\n"
    ),
    "retirement.md": (
        "# Saving for retirement\n\n"
        "Start early so compound growth does the heavy lifting. Low-cost index funds that track the whole market "
        "beat most actively managed funds after fees. Take the full employer match in a workplace pension, keep "
        "an emergency fund of three to six months of expenses in cash, and shift gradually from shares towards "
        "bonds as the retirement date gets closer."
    ),
    "kittens.md": (
        "# Caring for a new kitten\n\n"
        "Kittens need four small meals a day of food made for growing cats until about six months old. Book the "
        "first vaccinations at eight to nine weeks, with a booster a month later, and ask the vet about worming "
        "and flea treatment. Give a quiet room with a litter tray, a scratching post and hiding places for the "
        "first few days, and neuter before sexual maturity."
    ),
    "washing_machine.md": (
        "# Washing machine fault codes\n\n"
        "F21 means the drum did not drain in time: clear the coin trap behind the small flap at the front. F05 "
        "points to a faulty pressure switch that cannot tell how much water is in the drum. F34 means the door "
        "lock did not engage; close the door firmly and restart. A machine that walks across the floor is "
        "unbalanced: level the feet and do not wash a single heavy towel on its own."
    ),
    "boiler.md": (
        "# Gas boiler fault codes\n\n"
        "F28 means the boiler failed to light: check that the gas supply is on and that other gas appliances work. "
        "F22 means the system pressure is too low; top it up to about 1.2 bar with the filling loop. F75 indicates "
        "a pressure sensor fault that needs an engineer. Bleed radiators that are cold at the top, then check the "
        "pressure again."
    ),
    "bread_machine.md": (
        "# Using a bread machine\n\n"
        "Put the liquids in the pan first, then the flour, with the dried instant yeast on top so it does not touch "
        "the salt or the water before the programme starts. The basic programme takes about three hours; the "
        "rapid one is quicker but the loaf rises less. Take the bread out as soon as the cycle ends so the crust "
        "does not go soggy."
    ),
    "running_shoes.md": (
        "# Choosing running shoes\n\n"
        "Buy shoes in the afternoon when feet are largest and leave a thumb's width in front of the big toe. "
        "Cushioned trainers suit long road runs; lighter racing flats suit short fast sessions. Replace a pair "
        "after 600 to 800 kilometres because the foam loses its bounce. A gait analysis shows whether you need "
        "support for overpronation."
    ),
    "mesh_wifi.md": (
        "# Mesh Wi-Fi systems\n\n"
        "A mesh system replaces one router with several nodes that share a single network name, so phones roam "
        "between them without dropping the call. Place each node within two rooms of the last one, not in a "
        "cupboard. A wired backhaul between nodes keeps speeds high; wireless backhaul halves the bandwidth on "
        "each hop."
    ),
    "cuts.md": (
        "# First aid for cuts and grazes\n\n"
        "Press firmly on a bleeding wound with a clean pad and raise the injured limb above the heart. Rinse a "
        "graze under running tap water to remove grit, pat it dry and cover it with a plaster. Seek care if the "
        "bleeding does not stop after ten minutes of pressure, the edges gape open, or the wound was made by a "
        "rusty or dirty object and tetanus jabs are not up to date."
    ),
}

# (question, document that answers it, heading of the section that answers it or None for any)
QUESTIONS: tuple[tuple[str, str, str | None], ...] = (
    ("How do I keep my wild yeast culture going before I make a loaf?", "sourdough.md", None),
    ("What temperature should the pot be for the crusty bread?", "sourdough.md", None),
    ("Does a tree shadow on part of my roof ruin electricity generation?", "solar.md", None),
    ("Can I get paid for the power my house sends back to the grid?", "solar.md", None),
    ("How should I increase my running distance each week before the big race?", "marathon.md", None),
    ("What should I eat during 42 km so I don't run out of energy?", "marathon.md", None),
    ("Why are the bottom leaves of my pot plant turning yellow?", "houseplants.md", None),
    ("Which window is best for a fern?", "houseplants.md", None),
    ("Which encryption setting should my wireless network use?", "router.md", None),
    ("My neighbours' networks interfere with mine, what channel do I pick?", "router.md", None),
    ("How do I stop one agent from publishing on another agent's topics?", "mosquitto.md", "acl_file"),
    ("How do I refuse clients that log in without a password?", "mosquitto.md", "allow_anonymous"),
    ("What ratio of leaves to kitchen scraps goes in the heap?", "compost.md", None),
    ("How long until the rotting pile is ready to spread?", "compost.md", None),
    ("Should I put ice on a scald from boiling water?", "burns.md", None),
    ("When does a burned hand need a hospital?", "burns.md", None),
    ("My coffee shot is sour and too quick, what do I change?", "espresso.md", None),
    ("How many grams of beans for one double shot?", "espresso.md", None),
    ("The dishwasher shows E1047, what is wrong?", "dishwasher.md", "E1047"),
    ("What does code E2210 mean?", "dishwasher.md", "E2210"),
    ("Are tracker funds better than paying a manager to pick stocks?", "retirement.md", None),
    ("How much cash should I keep aside for emergencies?", "retirement.md", None),
    ("When does a young cat need its first jabs?", "kittens.md", None),
    ("How often should I feed a baby cat?", "kittens.md", None),
    # Look-ups of an exact code or option name, where one section of a reference answers.
    ("E2201 on the dishwasher", "dishwasher.md", "E2201"),
    ("dishwasher code E3310", "dishwasher.md", "E3310"),
    ("E1074 fix", "dishwasher.md", "E1074"),
    ("How do I clear an error code on the dishwasher?", "dishwasher.md", "Reset"),
    ("What is max_queued_messages for?", "mosquitto.md", "max_queued_messages"),
    ("persistence_location", "mosquitto.md", "persistence_location"),
    ("What does keepalive_interval control?", "mosquitto.md", "keepalive_interval"),
    ("How do I create the password_file?", "mosquitto.md", "password_file"),
    ("What does F28 mean on my heating?", "boiler.md", None),
    ("The pressure gauge is low and the display shows F22, what do I do?", "boiler.md", None),
    ("What does the F21 fault on my laundry machine mean?", "washing_machine.md", None),
    ("Why does my washer jump around the room during the spin?", "washing_machine.md", None),
    ("Where does the yeast go in the pan of an automatic loaf maker?", "bread_machine.md", None),
    ("How many kilometres do trainers last before I should buy new ones?", "running_shoes.md", None),
    ("How far apart should I put the satellites of a multi-node network?", "mesh_wifi.md", None),
    ("How do I stop a deep cut on my arm from bleeding?", "cuts.md", None),
)

# Questions none of the documents answers: a RAG answer to them must cite nothing (the relevance floor).
UNRELATED_QUESTIONS: tuple[str, ...] = (
    "Who won the football world cup in 1998?",
    "What is the capital of Australia?",
    "How do I change a flat tyre on my car?",
    "Write a haiku about autumn.",
    "What is 17 times 23?",
    "Explain quantum entanglement simply.",
    "Translate 'good morning' into Spanish.",
    "Who painted the Mona Lisa?",
    "How do I sort a list in Python?",
    "What is the tallest mountain in Africa?",
    "hello",
    "Tell me a joke",
    "What time is it in Tokyo?",
    "Recommend a science fiction novel.",
    "How does a car engine work?",
    "What is the boiling point of water on Everest?",
)


@dataclass(frozen=True)
class RetrievalScore:
    """How often the right document came back, and how high."""

    mode: str
    recall_at_1: float
    recall_at_3: float
    recall_at_5: float
    mean_reciprocal_rank: float
    misses_at_3: tuple[str, ...]


def unrelated_hit_rate(store: RagStore, mode: SearchMode, k: int = 4, *, min_relevance: float | None = None) -> float:
    """Share of :data:`UNRELATED_QUESTIONS` for which a search returns any passage (each would be a false citation)."""
    found = sum(bool(store.search(question, k=k, mode=mode, min_relevance=min_relevance))
                for question in UNRELATED_QUESTIONS)
    return found / len(UNRELATED_QUESTIONS)


def load_corpus(store: RagStore) -> dict[str, str]:
    """Add every corpus document; returns document name → id."""
    return {name: store.add_text(text, name).id for name, text in CORPUS.items()}


def evaluate(
    store: RagStore,
    mode: SearchMode,
    questions: Sequence[tuple[str, str, str | None]] = QUESTIONS,
    k: int = 5,
    *,
    min_relevance: float | None = None,
) -> RetrievalScore:
    """Recall@1/3/5 and MRR over ranked chunks: a chunk is right when its document (and section, if given) match.

    Chunks are what a RAG prompt receives, so the rank of the first right chunk is what matters.
    ``min_relevance`` overrides the store's relevance floor (-1 turns it off, for the before/after figures).
    """
    hits = {1: 0, 3: 0, 5: 0}
    reciprocal_ranks = 0.0
    misses: list[str] = []
    for question, expected_document, expected_section in questions:
        rank: int | None = None
        ranked = store.search(question, k=max(k, 10), mode=mode, min_relevance=min_relevance)
        for position, hit in enumerate(ranked, start=1):
            section = (hit.section or "").rsplit(" > ", 1)[-1]
            if hit.document_name == expected_document and expected_section in (None, section):
                rank = position
                break
        for cutoff in hits:
            if rank is not None and rank <= cutoff:
                hits[cutoff] += 1
        if rank is None or rank > 3:
            misses.append(question)
        reciprocal_ranks += 1.0 / rank if rank is not None else 0.0
    total = len(questions)
    return RetrievalScore(
        mode=mode,
        recall_at_1=hits[1] / total,
        recall_at_3=hits[3] / total,
        recall_at_5=hits[5] / total,
        mean_reciprocal_rank=reciprocal_ranks / total,
        misses_at_3=tuple(misses),
    )
