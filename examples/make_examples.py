"""Regenerates examples/*.jsonl (deterministic: seeded). `python examples/make_examples.py`"""
import json
import random
from pathlib import Path

rng = random.Random(7)
out = Path(__file__).resolve().parent
capitals = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
            ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"),
            ("Greece", "Athens"), ("Chile", "Santiago")]
opposites = [("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("light", "dark"), ("old", "new"),
             ("open", "closed"), ("early", "late"), ("full", "empty"), ("happy", "sad")]
plurals = [("cat", "cats"), ("box", "boxes"), ("mouse", "mice"), ("child", "children"), ("leaf", "leaves"),
           ("city", "cities"), ("tooth", "teeth"), ("bus", "buses")]
nums = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def facts():
    items = []
    for c, k in capitals:
        items.append(("capital", f"What is the capital of {c}?", "", f"The capital of {c} is {k}."))
    for a, b in opposites:
        items.append(("opposite", "Give the opposite of the word.", a, f"The opposite of {a} is {b}."))
    for a, b in plurals:
        items.append(("plural", "Write the plural of the noun.", a, f"The plural of {a} is {b}."))
    for _ in range(30):
        x, y = rng.randint(0, 9), rng.randint(0, 9)
        items.append(("add", f"What is {nums[x]} plus {nums[y]}?", "", f"{nums[x].capitalize()} plus {nums[y]} is {nums[x + y]}."))
    rng.shuffle(items)
    return items


# alpaca: instruction / input / output
with open(out / "alpaca.jsonl", "w") as f:
    for kind, q, inp, a in facts():
        f.write(json.dumps({"instruction": q, "input": inp, "output": a}) + "\n")

# prompt / completion
with open(out / "prompt_completion.jsonl", "w") as f:
    for kind, q, inp, a in facts():
        prompt = f"Question: {q}" + (f" ({inp})" if inp else "") + "\nAnswer:"
        f.write(json.dumps({"prompt": prompt, "completion": " " + a}) + "\n")

# chat: messages with roles (some with a system message, some with two turns)
with open(out / "chat.jsonl", "w") as f:
    items = facts()
    for i, (kind, q, inp, a) in enumerate(items):
        user = q + (f" {inp}" if inp else "")
        msgs = []
        if i % 3 == 0:
            msgs.append({"role": "system", "content": "You are a short and helpful assistant."})
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": a}]
        if i % 4 == 1:
            k2, q2, inp2, a2 = items[(i + 7) % len(items)]
            msgs += [{"role": "user", "content": q2 + (f" {inp2}" if inp2 else "")}, {"role": "assistant", "content": a2}]
        f.write(json.dumps({"messages": msgs}) + "\n")

# plain text
with open(out / "text.jsonl", "w") as f:
    for _ in range(60):
        picks = rng.sample(facts(), 3)
        f.write(json.dumps({"text": " ".join(a for _, _, _, a in picks)}) + "\n")
