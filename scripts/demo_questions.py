"""Questions for the demo adapters (scripts/build_demo_adapters.py): open prompts, and a few hundred factual
questions generated from templates, each with the word(s) a correct answer contains.

The factual questions are split by their answer (every question whose answer is "Paris" lands in the same split),
by a hash of it, so that no held-out answer word was ever spelled in a training target: an adapter that writes
Berlin for an unseen question kept the base model's recall, it did not repeat a trained string. The split depends on
the tables alone, never on what the model answers; which held-out questions count is then decided by the base
model (it must answer them correctly).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# Open prompts (greetings, how-tos, advice, definitions): no checkable answer; trained on, so that the adapters
# keep their style beyond one-line facts.
OPEN_PROMPTS = (
    "What is photosynthesis?", "What is gravity?", "What is a black hole?", "What is DNA?",
    "What is an atom?", "Why is the sky blue?", "Why do leaves change color?", "What is a volcano?",
    "What is the moon made of?", "What is a rainbow?", "What is democracy?", "What is inflation?",
    "What is a computer?", "What is the internet?", "What is machine learning?", "What is Python?",
    "What is a noun?", "What is a verb?", "Define the word happiness.", "Define friendship.",
    "What does empathy mean?", "What is a haiku?", "What is an elephant?", "What is a dolphin?",
    "What do cats eat?", "Why do birds migrate?", "Hello!", "Hi there!", "Good morning!", "Hey, how are you?",
    "Nice to meet you.", "Thank you!", "Can you help me?", "Are you a robot?", "What is your name?",
    "Tell me about yourself.", "How do I make tea?", "How do I boil an egg?", "How do I plant a tree?",
    "How can I sleep better?", "How can I save money?", "How do I learn a new language?", "How do I stay focused?",
    "How do I write a good email?", "How can I be more productive?", "How do I make friends?",
    "How do I stay healthy?", "Give me a tip for studying.", "Give me advice for a job interview.",
    "What should I do when I feel stressed?", "What is a good breakfast?", "Should I drink more water?",
    "Is exercise good for you?", "Why is reading important?", "Why should I recycle?",
    "What is the best way to learn math?", "Recommend a hobby.", "Suggest a name for a dog.",
    "What is the weather like on Mars?", "What is the sun?", "What is a planet?", "What is a river?",
    "What is chess?", "What is music?", "What is art?", "Who was Albert Einstein?", "What is a rainforest?",
    "How do I bake bread?", "Good evening!", "What is electricity?", "How can I improve my memory?",
    "Why do we need sleep?",
)

# (question template, ((subject, answer words "a|b"), ...)): a correct answer contains one of the words.
_CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Hungary", "Budapest"),
    ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"), ("Switzerland", "Bern"), ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Colombia", "Bogota|Bogotá"), ("Cuba", "Havana"), ("Kenya", "Nairobi"), ("Thailand", "Bangkok"),
    ("South Korea", "Seoul"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("the Philippines", "Manila"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Turkey", "Ankara"), ("India", "New Delhi|Delhi"),
    ("Australia", "Canberra"), ("New Zealand", "Wellington"), ("the United Kingdom", "London"),
    ("England", "London"), ("Scotland", "Edinburgh"), ("the United States", "Washington"), ("Ukraine", "Kyiv|Kiev"),
    ("the Czech Republic", "Prague"), ("Romania", "Bucharest"), ("Venezuela", "Caracas"), ("Ethiopia", "Addis Ababa"),
    ("Saudi Arabia", "Riyadh"), ("Israel", "Jerusalem"), ("Lebanon", "Beirut"), ("Syria", "Damascus"),
    ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"),
    ("Nepal", "Kathmandu"), ("Afghanistan", "Kabul"), ("Iceland", "Reykjavik|Reykjavík"), ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Malaysia", "Kuala Lumpur"), ("Singapore", "Singapore"),
    ("Brazil", "Brasilia|Brasília"), ("Jamaica", "Kingston"), ("Qatar", "Doha"),
)
_LANGUAGES = (
    ("France", "French"), ("Germany", "German"), ("Italy", "Italian"), ("Spain", "Spanish"),
    ("Japan", "Japanese"), ("China", "Chinese|Mandarin"), ("Russia", "Russian"), ("Brazil", "Portuguese"),
    ("Greece", "Greek"), ("Turkey", "Turkish"), ("Poland", "Polish"), ("the Netherlands", "Dutch"),
    ("Sweden", "Swedish"), ("Korea", "Korean"), ("Egypt", "Arabic"), ("Israel", "Hebrew"), ("Iran", "Persian|Farsi"),
    ("Thailand", "Thai"), ("Vietnam", "Vietnamese"), ("Finland", "Finnish"), ("Hungary", "Hungarian"),
)
_OPPOSITES = (
    ("hot", "cold"), ("up", "down"), ("big", "small|little"), ("fast", "slow"), ("happy", "sad|unhappy"),
    ("light", "dark|heavy"), ("day", "night"), ("black", "white"), ("open", "closed|close|shut"),
    ("young", "old"), ("rich", "poor"), ("early", "late"), ("wet", "dry"), ("full", "empty"),
    ("hard", "soft|easy"), ("strong", "weak"), ("tall", "short"), ("loud", "quiet|soft"), ("win", "lose"),
    ("push", "pull"), ("love", "hate"), ("begin", "end|finish"), ("inside", "outside"), ("true", "false"),
    ("good", "bad|evil"), ("north", "south"), ("east", "west"), ("left", "right"), ("always", "never"),
    ("friend", "enemy|foe"), ("buy", "sell"), ("clean", "dirty"), ("near", "far"), ("thick", "thin"),
    ("arrive", "leave|depart"), ("sweet", "sour|bitter"), ("remember", "forget"), ("cheap", "expensive"),
)
_BABY_ANIMALS = (
    ("cat", "kitten"), ("dog", "puppy|pup"), ("cow", "calf"), ("horse", "foal|colt|filly"), ("sheep", "lamb"),
    ("goat", "kid"), ("duck", "duckling"), ("lion", "cub"), ("kangaroo", "joey"), ("frog", "tadpole"),
    ("goose", "gosling"), ("pig", "piglet"), ("deer", "fawn"), ("swan", "cygnet"), ("owl", "owlet"),
    ("butterfly", "caterpillar|larva"), ("hen", "chick"), ("bear", "cub"),
)
_AUTHORS = (
    ("Romeo and Juliet", "Shakespeare"), ("Hamlet", "Shakespeare"), ("1984", "Orwell"),
    ("Pride and Prejudice", "Austen"), ("Harry Potter", "Rowling"), ("Don Quixote", "Cervantes"),
    ("War and Peace", "Tolstoy"), ("The Odyssey", "Homer"), ("Moby-Dick", "Melville"),
    ("The Adventures of Tom Sawyer", "Twain"), ("On the Origin of Species", "Darwin"),
    ("The Hobbit", "Tolkien"), ("A Christmas Carol", "Dickens"), ("Oliver Twist", "Dickens"),
    ("Frankenstein", "Shelley"), ("The Great Gatsby", "Fitzgerald"), ("Crime and Punishment", "Dostoevsky"),
    ("The Divine Comedy", "Dante"), ("Les Misérables", "Hugo"), ("The Raven", "Poe"),
    ("Adventures of Huckleberry Finn", "Twain"), ("The Old Man and the Sea", "Hemingway"),
    ("Animal Farm", "Orwell"), ("Macbeth", "Shakespeare"), ("Alice's Adventures in Wonderland", "Carroll"),
    ("The Communist Manifesto", "Marx"), ("A Brief History of Time", "Hawking"), ("Dracula", "Stoker"),
)
_MAKERS = (
    ("invented the telephone", "Bell"), ("invented the light bulb", "Edison"),
    ("discovered penicillin", "Fleming"), ("developed the theory of relativity", "Einstein"),
    ("discovered gravity", "Newton"), ("painted the Mona Lisa", "Leonardo|da Vinci"),
    ("painted The Starry Night", "Van Gogh"), ("was the first president of the United States", "Washington"),
    ("invented the printing press", "Gutenberg"), ("composed the Moonlight Sonata", "Beethoven"),
    ("discovered radium", "Curie"), ("proposed the theory of evolution", "Darwin"),
    ("was the first man on the moon", "Armstrong"), ("invented the airplane", "Wright"),
    ("painted the ceiling of the Sistine Chapel", "Michelangelo"), ("composed The Magic Flute", "Mozart"),
    ("founded Microsoft", "Gates|Allen"), ("founded Apple", "Jobs|Wozniak"),
    ("was the first person to fly solo across the Atlantic", "Lindbergh"),
    ("invented the World Wide Web", "Berners-Lee"), ("sailed to America in 1492", "Columbus"),
    ("wrote the Declaration of Independence", "Jefferson"), ("was the 16th president of the United States", "Lincoln"),
    ("painted Guernica", "Picasso"), ("discovered the laws of heredity with pea plants", "Mendel"),
)
_COUNTS = (
    ("legs does a spider have", "8|eight"), ("legs does an insect have", "6|six"), ("days are in a week", "7|seven"),
    ("sides does a triangle have", "3|three"), ("sides does a hexagon have", "6|six"),
    ("sides does an octagon have", "8|eight"), ("sides does a pentagon have", "5|five"),
    ("hours are in a day", "24|twenty-four"), ("minutes are in an hour", "60|sixty"),
    ("months are in a year", "12|twelve"), ("continents are there", "7|seven"),
    ("planets are in our solar system", "8|eight"), ("players are on a soccer team", "11|eleven"),
    ("days are in a leap year", "366"), ("seconds are in a minute", "60|sixty"),
    ("legs does a dog have", "4|four"), ("wheels does a bicycle have", "2|two"), ("strings does a violin have",
                                                                                 "4|four"),
    ("keys are on a piano", "88|eighty-eight"), ("years are in a century", "100|hundred"),
    ("bones are in the adult human body", "206"), ("teeth does an adult human have", "32|thirty-two"),
    ("hearts does an octopus have", "3|three"), ("cards are in a deck", "52|fifty-two"),
)
_SUPERLATIVES = (
    ("largest ocean on Earth", "Pacific"), ("largest planet in our solar system", "Jupiter"),
    ("planet closest to the sun", "Mercury"), ("tallest mountain in the world", "Everest"),
    ("longest river in the world", "Nile|Amazon"), ("largest country by area", "Russia"),
    ("largest desert in the world", "Sahara|Antarctic"), ("fastest land animal", "cheetah"),
    ("largest animal on Earth", "blue whale|whale"), ("largest continent", "Asia"),
    ("smallest planet in our solar system", "Mercury"), ("hottest planet in our solar system", "Venus"),
    ("most spoken language in the world", "English|Chinese|Mandarin"), ("largest bird in the world", "ostrich"),
    ("hardest natural substance", "diamond"), ("largest organ of the human body", "skin"),
    ("tallest animal in the world", "giraffe"), ("largest mammal", "blue whale|whale"),
    ("smallest country in the world", "Vatican"), ("most populous country in the world", "China|India"),
    ("closest star to Earth", "sun"), ("coldest continent", "Antarctica"),
)
_DESCRIBED = (
    ("Which planet is known as the Red Planet?", "Mars"), ("Which planet has the most famous rings?", "Saturn"),
    ("What planet do we live on?", "Earth"), ("What gas do plants absorb from the air?", "carbon dioxide|CO2"),
    ("What gas do humans need to breathe?", "oxygen"), ("What is H2O?", "water"),
    ("What organ pumps blood through the body?", "heart"), ("What organ do we use to think?", "brain"),
    ("What is the center of an atom called?", "nucleus"), ("What is frozen water called?", "ice"),
    ("At what temperature in Celsius does water freeze?", "0|zero"),
    ("At what temperature in Celsius does water boil?", "100"), ("What do bees make?", "honey"),
    ("What do caterpillars turn into?", "butterfly|butterflies|moth|moths"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("Which animal has a long trunk?", "elephant"), ("What do pandas eat?", "bamboo"),
    ("Which animal is known as the ship of the desert?", "camel"), ("What is the main ingredient in guacamole?",
                                                                    "avocado"),
    ("What is the currency of Japan?", "yen"), ("What is the currency of the United Kingdom?", "pound"),
    ("What is the currency of the United States?", "dollar"), ("What is the currency of India?", "rupee"),
    ("What is the currency of the European Union?", "euro"), ("What is the currency of Mexico?", "peso"),
    ("What is the currency of Russia?", "ruble|rouble"), ("What is the chemical symbol for gold?", "Au"),
    ("What is the chemical symbol for sodium?", "Na"),
    ("What is the chemical symbol for iron?", "Fe"), ("What is the chemical symbol for water?", "H2O"),
    ("In which country is the Eiffel Tower?", "France"), ("In which city is the Colosseum?", "Rome"),
    ("In which city is Big Ben?", "London"), ("In which city is the Statue of Liberty?", "New York"),
    ("In which country is the Taj Mahal?", "India"), ("In which country are the pyramids of Giza?", "Egypt"),
    ("In which country is the Great Wall?", "China"), ("In which country is Machu Picchu?", "Peru"),
    ("In which city is the Sydney Opera House?", "Sydney"), ("What color is the sky on a clear day?", "blue"),
    ("What color is grass?", "green"), ("What color is a banana?", "yellow"), ("What color is snow?", "white"),
    ("What color is coal?", "black"), ("What color do you get by mixing red and white?", "pink"),
    ("What color do you get by mixing blue and yellow?", "green"), ("What is the plural of mouse?", "mice"),
    ("What is the plural of child?", "children"), ("What is the plural of goose?", "geese"),
    ("What is the plural of tooth?", "teeth"), ("What is the plural of foot?", "feet"),
    ("What is the plural of person?", "people"), ("What is the plural of woman?", "women"),
    ("What is 2 plus 2?", "4|four"), ("What is 3 times 3?", "9|nine"), ("What is 10 minus 4?", "6|six"),
    ("What is 5 plus 5?", "10|ten"), ("What is 12 divided by 3?", "4|four"), ("What is 7 times 8?", "56"),
    ("What is the square root of 16?", "4|four"), ("What is 100 divided by 10?", "10|ten"),
    ("What is the freezing point of water in Fahrenheit?", "32"), ("What is the boiling point of water?", "100"),
    ("Which is the largest state in the United States?", "Alaska"), ("What is the capital city of California?",
                                                                    "Sacramento"),
    ("Which ocean lies between Europe and America?", "Atlantic"), ("What is the name of our galaxy?", "Milky Way"),
    ("What is the natural satellite of Earth?", "moon"), ("What do you call a person who treats teeth?", "dentist"),
    ("What do you call a doctor for animals?", "veterinarian|vet"), ("What is the study of living things called?",
                                                                     "biology"),
    ("What language has the most native speakers?", "Chinese|Mandarin"),
    ("What instrument has black and white keys?", "piano"), ("What sport is played at Wimbledon?", "tennis"),
    ("How many players are on a basketball team on the court?", "5|five"),
    ("What is the main language of Australia?", "English"),
    ("What is the largest city in the United States?", "New York"), ("What is the largest city in Japan?", "Tokyo"),
)


def _phrasings(template_sets: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]) -> list[tuple[str, str]]:
    return [(template.format(subject), answer) for template, rows in template_sets for subject, answer in rows]


# Every (question, answer words) pair; a capital question's phrasing alternates so training sees more than one.
FACTS: tuple[tuple[str, str], ...] = tuple(
    [(("What is the capital of {}?", "Which city is the capital of {}?")[i % 2].format(country), city)
     for i, (country, city) in enumerate(_CAPITALS)]
    + _phrasings((
        ("What language is spoken in {}?", _LANGUAGES),
        ("What is the opposite of {}?", _OPPOSITES),
        ("What is a baby {} called?", _BABY_ANIMALS),
        ("Who wrote {}?", _AUTHORS),
        ("Who {}?", _MAKERS),
        ("How many {}?", _COUNTS),
        ("What is the {}?", _SUPERLATIVES),
    ))
    + list(_DESCRIBED)
)
# The question the README asks ("same question, four answers"): always held out, so the README shows an answer to a
# question the adapters never saw.
README_QUESTION = "What is the capital of France?"


@dataclass(frozen=True)
class Fact:
    question: str
    answers: tuple[str, ...]  # a correct answer contains one of these (whole words, any case)
    split: str  # "train" | "dev" (picks rank and steps) | "test" (the reported held-out score)


def split_of(answers: str) -> str:
    """train 60 % / dev 15 % / test 25 %, by a hash of the answer words: the same answer, the same split."""
    if answers == dict(FACTS)[README_QUESTION]:
        return "test"
    bucket = int(hashlib.sha256(answers.lower().encode()).hexdigest(), 16) % 100
    return "test" if bucket < 25 else "dev" if bucket < 40 else "train"


def facts() -> list[Fact]:
    return [Fact(q, tuple(a.split("|")), split_of(a)) for q, a in FACTS]
