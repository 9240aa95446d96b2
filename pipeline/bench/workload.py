"""The bench's prompt sets: real-looking prose of spread lengths, deterministic for a seed."""

from __future__ import annotations

import math
import random
from pathlib import Path

# Real-looking prose the prompts are cut from: encyclopedia-style sentences on mixed topics.
SENTENCES = (
    "The Nile flows north for about 6,650 kilometres before it reaches the Mediterranean Sea.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside leaves.",
    "In 1854 John Snow traced a cholera outbreak in London to a single water pump on Broad Street.",
    "A prime number has exactly two divisors: one and itself.",
    "The city council voted to extend the bike lane network by forty kilometres over three years.",
    "Honeybees communicate the direction of food with a waggle dance on the comb.",
    "Most of the salt in the Dead Sea arrives with the Jordan River and stays when water "
    "evaporates.",
    "The first transatlantic telegraph cable failed after three weeks of service in 1858.",
    "A hash table trades memory for lookups that take constant time on average.",
    "Glaciers carve U-shaped valleys, while rivers cut narrower V-shaped ones.",
    "The committee postponed its decision until the spring, citing incomplete cost estimates.",
    "Sourdough rises because wild yeast and lactic acid bacteria ferment the flour.",
    "Octopuses have three hearts and blue blood that carries oxygen with copper.",
    "Interest rates rose for the fourth quarter in a row as inflation stayed above target.",
    "The Rosetta Stone carries one decree in hieroglyphic, demotic and ancient Greek script.",
    "Garbage collectors free memory that a program can no longer reach.",
    "A marathon covers 42.195 kilometres, a distance fixed at the 1908 London Olympics.",
    "Lichens are partnerships between a fungus and an alga or a cyanobacterium.",
    "The library extended its opening hours after students petitioned for evening access.",
    "Copper conducts electricity well and resists corrosion, so it is common in wiring.",
    "The Great Barrier Reef can be seen from low Earth orbit.",
    "Supply chains lengthened during the decade as firms moved assembly to cheaper regions.",
    "Compilers translate source code into instructions a processor can execute.",
    "Volcanic ash can ground aircraft because it melts inside jet engines.",
    "Mozart wrote more than six hundred works before he died at thirty-five.",
    "Tides follow the Moon because its gravity pulls hardest on the nearest ocean.",
    "The survey found that two thirds of commuters would cycle if routes felt safer.",
    "A recipe for bread needs flour, water, salt and time more than skill.",
    "Satellites in geostationary orbit circle the Earth once a day above the equator.",
    "The museum returned the statue after records showed it had been taken in 1897.",
)
TASKS = (
    "Summarize the following notes in a few sentences.",
    "Write a short quiz with answers based on this text.",
    "Explain the passage below to a ten-year-old.",
    "List the facts in the text below as bullet points.",
    "Translate the main idea of these notes into plain English.",
    "Write a headline and a one-paragraph news story from these notes.",
    "Which statement below is the most surprising, and why?",
    "Rewrite the following text in a formal tone.",
)
CHARS_PER_TOKEN = 4.5  # English prose with a BPE tokenizer; only steers lengths, which are measured


def make_prompts(
    count: int,
    min_prompt_tokens: int,
    max_prompt_tokens: int,
    min_tokens: int,
    max_tokens: int,
    seed: int = 0,
    task: str | None = None,
    questions: int = 1,
) -> tuple[list[str], list[int]]:
    """`count` prompt texts of log-uniformly spread lengths, and each one's output budget.

    Each starts with `task` (None: one of TASKS, drawn per prompt). Deterministic for a seed,
    so every machine benchmarks the same prompts. With `questions` > 1, every `questions`
    prompts share one text (a document) and differ in the question that ends them, and the
    prompts are shuffled, so those sharing a document lie far apart (the case
    `--group-prefixes` is for).
    """
    if questions > 1:
        return _questions_over_documents(
            count,
            min_prompt_tokens,
            max_prompt_tokens,
            min_tokens,
            max_tokens,
            seed,
            task,
            questions,
        )
    rng = random.Random(seed)
    texts, budgets = [], []
    for i in range(count):
        target = _log_uniform(rng, min_prompt_tokens, max_prompt_tokens)
        drawn = f"{TASKS[rng.randrange(len(TASKS))]} (note {i})"
        # The prose is drawn as for the mixed set, so `task` changes the instruction alone.
        prose: list[str] = []
        length = len(drawn)
        while length < target * CHARS_PER_TOKEN:
            sentence = SENTENCES[rng.randrange(len(SENTENCES))]
            prose.append(sentence)
            length += len(sentence) + 1
        head = f"{task} (note {i})" if task else drawn
        text = " ".join([head, *prose])
        # Cut at a word boundary so the shortest prompts land near their target too.
        limit = max(int(target * CHARS_PER_TOKEN) + len(head) - len(drawn), len(head))
        if len(text) > limit:
            text = text[:limit].rsplit(" ", 1)[0]
        texts.append(text)
        budgets.append(_log_uniform(rng, min_tokens, max_tokens))
    return texts, budgets


QUESTIONS = (
    "Which place does the text name first?",
    "What number appears in the text, and what does it count?",
    "Which sentence would a child find the most surprising?",
    "Give the text a title of five words or fewer.",
    "Which statement in the text is about the past?",
    "Name one cause and its effect from the text.",
    "Which sentence is about science?",
    "Summarize the text in one sentence.",
)


def _questions_over_documents(
    count: int,
    min_prompt_tokens: int,
    max_prompt_tokens: int,
    min_tokens: int,
    max_tokens: int,
    seed: int,
    task: str | None,
    questions: int,
) -> tuple[list[str], list[int]]:
    documents, _ = make_prompts(
        -(-count // questions), min_prompt_tokens, max_prompt_tokens, 1, 1, seed, task
    )
    rng = random.Random(seed + 1)
    pairs = [(d, q) for d in range(len(documents)) for q in range(questions)][:count]
    rng.shuffle(pairs)
    texts = [
        f"{documents[d]}\n\nQuestion {q + 1}: {QUESTIONS[q % len(QUESTIONS)]}" for d, q in pairs
    ]
    return texts, [_log_uniform(rng, min_tokens, max_tokens) for _ in texts]


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    if lo == hi:
        return lo
    return min(hi, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))


def write_prompt_file(
    path: Path, texts: list[str], budgets: list[int], adapters: list[str | None] | None = None
) -> Path:
    """The bench's input: prompts, each one's output budget and (LoRA benches) its adapter."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"prompt": texts, "max_tokens": pa.array(budgets, pa.int32())}
    if adapters is not None:
        columns["adapter"] = pa.array(adapters, pa.string())
    table = pa.table(columns)
    pq.write_table(table, path, row_group_size=8192)
    return path


def make_io_input(path: Path, rows: int, seed: int = 0) -> Path:
    """A Parquet file of `rows` short, distinct prompts, written a row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    schema = pa.schema([("prompt", pa.string())])
    group = 65_536
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for lo in range(0, rows, group):
            texts = []
            for i in range(lo, min(rows, lo + group)):
                a = SENTENCES[rng.randrange(len(SENTENCES))]
                b = SENTENCES[rng.randrange(len(SENTENCES))]
                texts.append(f"{TASKS[i % len(TASKS)]} (row {i}) {a} {b}")
            writer.write_table(pa.table({"prompt": texts}, schema=schema))
    return path
