"""Chat training prompts, written for this project (none taken from an eval set).

The shared self-instruct seeds are 175 short prompts, so a draft trained on their answers
sees little open-ended chat (mt-bench tau ~1.2 for the shipped draft). This module writes
a chat prompt set in the regenerate format (``{"conversations": [{"role": "user",
"content": ...}]}`` per line): each kind of request a chat assistant meets (writing,
role-play, explanation, advice, reasoning, extraction, comparison, planning) phrased over
its own list of subjects. Those 166 are few, so a second set crosses general FRAMES
(explain, argue, quiz, summarise, tell a story ...) with a broad list of TOPICS; it comes
after the first in the file, so the first set's line numbers never change; a third set
(FRAMES_2 over the same topics: role-play, professional writing, debate, formats) comes
last for the same reason.
``tests/test_chat_prompts.py`` checks that no prompt shares an eight-word run with the chat
eval sets.

    python -m deepspec_jax.data.chat_prompts --output=data/smollm2/chat_prompts.jsonl
"""

from __future__ import annotations

import sys

from absl import flags

from deepspec_jax import cli
from deepspec_jax.data.jsonl import write_user_prompts

# (template, subjects): each template has one ``{}`` slot.
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Write a short blog post about {}.", (
        "learning to cook at home on a budget", "a weekend hiking trip in the mountains",
        "why public libraries still matter", "starting a vegetable garden on a balcony",
        "the first month of learning a new language", "working from a small apartment",
        "visiting a night market for the first time", "restoring an old bicycle")),
    ("Write a friendly email to {}.", (
        "a neighbour, asking them to water your plants while you travel",
        "a colleague, thanking them for covering your shift",
        "a landlord, reporting a leaking kitchen tap",
        "a teacher, asking how your child can improve at reading",
        "a friend you have not seen for years, suggesting a meeting",
        "a client, explaining that a delivery will be two days late",
        "a new team member, welcoming them to the team")),
    ("Write a short poem about {}.", (
        "the first snow of winter", "an old lighthouse", "a busy train station at dawn",
        "a cat asleep in the sun", "the smell of rain on dry earth", "a city after midnight",
        "the last day of summer")),
    ("Write a short story, under 300 words, in which {}.", (
        "a robot learns to paint", "two strangers share an umbrella",
        "a child finds a map in a library book", "a baker forgets a secret ingredient",
        "an astronaut hears music on the radio", "a lost dog finds its way home",
        "a village wakes up to find the river has changed course")),
    ("Pretend you are {}. Introduce yourself and describe a typical day.", (
        "a lighthouse keeper on a remote island", "a chef in a busy restaurant",
        "a museum tour guide", "a park ranger", "a medieval blacksmith",
        "a barista in a small coffee shop", "a ship's navigator in the 1700s",
        "a zookeeper who cares for penguins")),
    ("Explain {} to a ten-year-old.", (
        "how airplanes stay in the air", "why the sky is blue", "what electricity is",
        "how vaccines work", "why we have seasons", "how a computer stores information",
        "what gravity does", "how bees make honey", "why the moon changes shape")),
    ("Explain the difference between {}.", (
        "weather and climate", "a virus and a bacterium", "speed and velocity",
        "a simile and a metaphor", "RAM and storage in a computer", "an atom and a molecule",
        "a democracy and a monarchy", "interest and dividends", "a stack and a queue")),
    ("What are the main causes and effects of {}?", (
        "inflation", "deforestation", "the fall of the Roman Empire",
        "the industrial revolution", "urban traffic congestion", "ocean acidification",
        "the invention of the printing press")),
    ("Give me five practical tips for {}.", (
        "sleeping better", "saving money on groceries", "staying focused while studying",
        "preparing for a job interview", "keeping houseplants alive", "running a first 5K",
        "reducing screen time", "public speaking", "packing light for a trip",
        "learning to play the guitar")),
    ("Plan a {}.", (
        "three-day trip to a city with museums and parks",
        "weekly meal plan for a vegetarian family of four",
        "one-month beginner workout routine", "birthday party for a seven-year-old",
        "study schedule for a final exam in two weeks", "small community clean-up day",
        "budget for a student living alone")),
    ("Compare {} and recommend one for a beginner.", (
        "cats and dogs as pets", "electric and petrol cars", "renting and buying a home",
        "learning piano and learning guitar", "tea and coffee as a morning drink",
        "running and swimming for fitness", "paper books and e-readers")),
    ("What are the pros and cons of {}?", (
        "working from home", "social media for teenagers", "nuclear power",
        "a four-day work week", "school uniforms", "living in a big city",
        "self-driving cars", "online learning")),
    ("Solve this and explain your reasoning step by step: {}", (
        "If three pencils cost 45 cents, how much do eleven pencils cost?",
        "A train leaves at 9:40 and arrives at 13:15. How long is the journey?",
        "Anna is older than Ben, and Ben is older than Cara. Who is the youngest?",
        "A rectangle has a perimeter of 30 cm and a width of 5 cm. What is its area?",
        "Which is larger, 3/8 or 5/12?",
        "A shop gives 20% off, then another 10% off the new price. What is the total discount?",
        "If today is Tuesday, what day of the week will it be in 100 days?",
        "A tank fills in 6 hours with one pipe and 3 hours with another. How long with both?")),
    ("Extract every {} from the text below and list them.\n\n{{text}}", (
        "person's name", "date", "city", "number", "company name")),
    ("Summarize the following paragraph in one sentence.\n\n{}", (
        "The town council met on Monday to discuss the new park. Residents asked for more "
        "benches and a playground, while some worried about noise. The council agreed to "
        "publish a plan next month and to hold another meeting before any work starts.",
        "Solar panels turn sunlight into electricity using layers of silicon. Their price "
        "has fallen sharply over the last decade, and many households now install them on "
        "their roofs. Storage batteries let people use the power at night as well.",
        "The museum's new exhibition shows tools used by farmers two hundred years ago. "
        "Visitors can try grinding grain by hand and watch a blacksmith at work. The "
        "exhibition is open every weekend until the end of the year.",
        "Regular walking improves heart health, mood and sleep. Doctors suggest at least "
        "thirty minutes a day, which can be split into shorter walks. Walking with a friend "
        "makes it easier to keep the habit.")),
    ("Write a product description for {}.", (
        "a reusable water bottle that keeps drinks cold for a day", "a foldable travel desk",
        "a solar-powered phone charger", "a handmade wooden chess set",
        "noise-cancelling headphones for children", "a smart plant pot that reminds you to water")),
    ("Describe the history of {} in a few paragraphs.", (
        "the bicycle", "chocolate", "the postal service", "the Olympic Games",
        "paper money", "the telephone", "public parks")),
    ("How does {} work? Keep the answer short.", (
        "a refrigerator", "a microwave oven", "GPS navigation", "a credit card payment",
        "a rainbow", "noise-cancelling technology", "a search engine", "a heat pump")),
    ("Write a dialogue between {}.", (
        "a customer and a shop assistant about a broken toaster",
        "two friends deciding where to eat dinner",
        "a student and a teacher about a late assignment",
        "a traveller and a hotel receptionist", "a detective and a witness",
        "a grandparent and a grandchild about life fifty years ago")),
    ("Give constructive feedback on this sentence and suggest a better version: \"{}\"", (
        "Me and him goes to the store every days.",
        "The report was wrote by the team in a hurry and it have many mistake.",
        "Their going to announce the results tomorrow, weather it rains or not.",
        "Due to the fact that it was raining, the game it was cancelled.",
        "She don't like when people is late to meetings.")),
    ("List ten {} and say one sentence about each.", (
        "famous inventions", "healthy snacks", "board games for families",
        "careers in science", "ways to reduce plastic waste", "classic novels",
        "national parks around the world")),
    ("Translate the following sentence into French and Spanish, then explain any tricky "
     "words: \"{}\"", (
        "The library closes early on Sundays.", "I would like a table for two by the window.",
        "My brother is learning to drive this summer.",
        "Could you tell me where the train station is?")),
    ("Write a short speech for {}.", (
        "a school graduation", "the opening of a new community garden",
        "a retirement party for a long-serving nurse", "a sports team after losing a final",
        "the first day of a charity fundraising week")),
    ("Answer as a helpful assistant: {}", (
        "My laptop is running slowly. What should I check first?",
        "How can I politely decline an invitation to a party?",
        "What should I pack for a week-long camping trip?",
        "How do I start a habit of reading every day?",
        "What is a good way to remember people's names?",
        "How can I make my small kitchen feel less cluttered?",
        "What questions should I ask when adopting a dog?")),
)

EXTRACT_TEXT = ("On 12 March 2021, Maria Lopez and David Chen opened a bakery called Golden Crust "
                "in Lisbon. By June they had hired 4 staff, and in October 2022 they opened a "
                "second shop in Porto with help from Northwind Traders. Their friend Sam Patel "
                "designed the logo, and 350 customers came on the first day.")


# Frames that read well with any topic below: each has one ``{}`` slot.
FRAMES: tuple[str, ...] = (
    "Write a short blog post about {}.",
    "Explain {} to a ten-year-old.",
    "What are the most common misconceptions about {}?",
    "Write a short poem about {}.",
    "Give me a three-paragraph introduction to {}.",
    "Tell me three surprising facts about {}, with a sentence of explanation for each.",
    "Write a persuasive paragraph arguing that every school should teach {}.",
    "Create a five-question multiple-choice quiz about {}, then give the answers.",
    "Summarize the most important ideas about {} as a bulleted list.",
    "You are a teacher giving a first lesson on {}. Write what you say to the class.",
    "Write a short story for children that teaches something about {}.",
    "What five questions would you ask an expert on {}? Say why for each.",
    "How has our understanding of {} changed over the last hundred years?",
    "Write a short, friendly conversation in which a grandparent tells a grandchild about {}.",
)

# The third set's frames (added with piece s25): the kinds of first turn mt-bench-style chat
# asks for that FRAMES lacks.
FRAMES_2: tuple[str, ...] = (
    "Pretend you are a museum guide opening an exhibition on {}. Welcome the visitors and "
    "walk them through the first three rooms.",
    "Write a short professional email inviting your colleagues to a lunchtime talk on {}.",
    "Describe {} in the voice of a nature documentary narrator.",
    "Write the headline and the first two paragraphs of a news article about a new "
    "discovery connected with {}.",
    "Draft an outline for a blog post about {}: a title, four subheadings and one sentence "
    "under each.",
    "Write the opening statement for a school debate on whether {} deserves more attention.",
    "Write a diary entry by someone who has spent forty years working with {}.",
    "Plan a one-week self-study course on {}, one short paragraph per day.",
    "Write a limerick about {} and then explain what makes it funny.",
    "Make a table of four facts about {}, with one column for the fact and one for why it "
    "matters.",
    "Write a dialogue between two friends who see {} very differently.",
    "Write a letter to a local newspaper about why people in town should care about {}.",
    "As a university professor, describe the open questions about {} that researchers are "
    "working on today.",
    "Explain {} using an extended comparison with cooking a family dinner.",
)

TOPICS: tuple[str, ...] = (
    "volcanoes", "the water cycle", "photosynthesis", "honeybees", "black holes",
    "recycling", "composting", "the human heart", "sleep", "the stock market",
    "compound interest", "the internet", "electric cars", "solar energy", "wind turbines",
    "the printing press", "ancient Egypt", "the Renaissance", "jazz music", "chess",
    "football", "healthy eating", "earthquakes", "the immune system", "dinosaurs",
    "the solar system", "coral reefs", "rainforests", "deserts", "glaciers",
    "the history of flight", "bridges", "skyscrapers", "trains", "the postal system",
    "money", "taxes", "voting", "the United Nations", "human rights",
    "the Roman Empire", "the Silk Road", "the Vikings", "the Moon landing", "the ocean floor",
    "whales", "octopuses", "migrating birds", "ants", "wolves",
    "tea", "bread making", "cheese", "spices", "coffee farming",
    "the piano", "painting with watercolours", "photography", "film making", "poetry",
    "learning a second language", "handwriting", "libraries", "museums", "maps",
    "time zones", "calendars", "clocks", "the metric system", "prime numbers",
    "probability", "statistics", "geometry", "algebra", "infinity",
    "robots", "artificial intelligence", "computer programming", "passwords and online safety",
    "video games", "smartphones", "batteries", "magnets", "electricity",
    "light", "sound", "gravity", "atoms", "chemical reactions",
    "DNA", "evolution", "the brain", "memory", "emotions",
    "friendship", "teamwork", "kindness", "leadership", "patience",
    "budgeting", "saving for the future", "starting a small business", "advertising",
    "supply and demand", "climate change", "air pollution", "clean water", "farming",
    "forests", "rivers", "mountains", "islands", "the Arctic",
    "weather forecasting", "hurricanes", "rainbows", "the seasons", "tides",
)


def crossed(frames: tuple[str, ...] = FRAMES) -> list[str]:
    """Every frame over every topic, topic-major (a prefix mixes all frames)."""
    return [frame.format(topic) for topic in TOPICS for frame in frames]


def prompts() -> list[str]:
    """Every kind over its subjects, subject-major (a prefix of the file mixes kinds, so
    ``regenerate --max_samples`` still covers many of them), then the two crossed sets."""
    rows = []
    for template, subjects in KINDS:
        for i, s in enumerate(subjects):
            rows.append((i, template.format(s).replace("{text}", EXTRACT_TEXT)))
    return [p for _, p in sorted(rows, key=lambda r: r[0])] + crossed() + crossed(FRAMES_2)


def write(path: str) -> int:
    """Writes the prompt JSONL atomically; returns the number of prompts."""
    return write_user_prompts(path, prompts())


def main(argv=None) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("output", None, "Prompt JSONL to write.", flag_values=fv, required=True)
    args = cli.parse(fv, argv, __doc__)
    n = write(args.output)
    print(f"wrote {n} prompts ({len(KINDS)} kinds of request, then {len(FRAMES)} and "
          f"{len(FRAMES_2)} frames x {len(TOPICS)} topics) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
