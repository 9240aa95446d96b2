"""Regenerate data/prompts.parquet, the sample input `make run` uses: `python data/make_sample.py`."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PROMPTS = [
    ("geography", "What is the capital of France?"),
    ("geography", "Name the longest river in Africa and the countries it flows through."),
    ("geography", "Why is the Dead Sea so salty?"),
    ("science", "Explain photosynthesis to a ten-year-old in three sentences."),
    ("science", "What is the difference between a virus and a bacterium?"),
    ("science", "Why is the sky blue?"),
    ("science", "How does a refrigerator keep food cold?"),
    ("science", "What causes the seasons on Earth?"),
    ("math", "What is 17 multiplied by 23? Show your steps."),
    ("math", "Explain what a prime number is and list the first five."),
    ("math", "A train travels 180 km in 2 hours. What is its average speed?"),
    ("math", "What is the derivative of x squared?"),
    ("coding", "Write a Python function that reverses a string."),
    ("coding", "What does the SQL keyword JOIN do?"),
    ("coding", "Explain the difference between a list and a tuple in Python."),
    ("coding", "Write a shell command that counts the lines in every .txt file in a folder."),
    ("coding", "What is a race condition, in one paragraph?"),
    ("writing", "Write a haiku about autumn leaves."),
    ("writing", "Suggest three names for a coffee shop near a university."),
    ("writing", "Rewrite this sentence more formally: 'gonna be late, traffic is nuts'."),
    ("writing", "Write a two-sentence horror story."),
    ("writing", "Draft a polite email declining a meeting invitation."),
    ("summarize", "Summarize in one sentence: The city council voted on Tuesday to extend the "
     "bike lane network by 40 kilometres over the next three years, citing a rise in cycling "
     "commuters and fewer traffic accidents on streets that already have protected lanes."),
    ("summarize", "Summarize in one sentence: Researchers found that people who took short "
     "walks after meals had lower blood sugar spikes than those who sat still, even when the "
     "walks lasted only two to five minutes."),
    ("classify", "Is this review positive or negative? 'The battery died after two days and "
     "support never answered.'"),
    ("classify", "Is this review positive or negative? 'Setup took five minutes and it has "
     "worked flawlessly since.'"),
    ("classify", "Which language is this: 'Wo ist der Bahnhof?'"),
    ("history", "Who was the first person to walk on the Moon, and in what year?"),
    ("history", "What was the Silk Road?"),
    ("history", "Why did the Roman Empire split into East and West?"),
    ("health", "Give three tips for sleeping better."),
    ("health", "How much water should an adult drink per day?"),
    ("cooking", "How do I make a simple tomato sauce?"),
    ("cooking", "What can I substitute for eggs in baking?"),
    ("cooking", "How long should I boil an egg for a soft yolk?"),
    ("advice", "How do I prepare for a job interview?"),
    ("advice", "What are good habits for learning a new language?"),
    ("advice", "How can I save money on groceries?"),
    ("trivia", "How many legs does a spider have?"),
    ("trivia", "What is the largest planet in our solar system?"),
    ("trivia", "What is the chemical symbol for gold?"),
    ("trivia", "Which instrument has 88 keys?"),
    ("translate", "Translate to Spanish: 'Where is the library?'"),
    ("translate", "Translate to French: 'I would like a cup of tea, please.'"),
    ("reasoning", "If all cats are animals and some animals are black, are all cats black?"),
    ("reasoning", "I have two coins that add up to 30 cents and one is not a nickel. What are they?"),
    ("explain", "What is inflation and why does it matter?"),
    ("explain", "How does a search engine rank web pages, roughly?"),
]


def main() -> None:
    table = pa.table(
        {
            "id": [f"sample-{i:03d}" for i in range(len(PROMPTS))],
            "category": [c for c, _ in PROMPTS],
            "prompt": [p for _, p in PROMPTS],
        }
    )
    out = Path(__file__).with_name("prompts.parquet")
    pq.write_table(table, out, compression="zstd")
    print(f"wrote {table.num_rows} prompts to {out}")


if __name__ == "__main__":
    main()
