"""Chat prompts shared by the decode benchmarks (one list, so their numbers compare)."""

PROMPTS = [
    "What is 12*7? Explain briefly.", "Write a Python function that reverses a string.",
    "Tell me a fun fact about the ocean.", "Summarise the plot of Hamlet in two sentences.",
    "How do I boil an egg?", "List three prime numbers greater than 100.",
    "Explain what a hash table is.", "Translate 'good morning' into French and Spanish.",
]
