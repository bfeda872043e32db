"""A fixed corpus of real English sentences for the real-weights validation.

Written for this project (no external data set): varied topics, lengths, registers and
punctuation, so that the embedding model sees the kinds of tokens it was trained on.
``calibration_sentences()`` and ``evaluation_sentences()`` split it into two disjoint
halves (even / odd positions), so the quantizer never sees the text it is judged on.
"""

from __future__ import annotations

__all__ = ["SENTENCES", "calibration_sentences", "evaluation_sentences"]

SENTENCES: tuple[str, ...] = (
    # everyday life
    "I left my umbrella on the train this morning.",
    "The kettle clicked off just as the phone started ringing.",
    "Could you pick up some milk and eggs on your way home?",
    "She always reads for half an hour before going to sleep.",
    "Our neighbours are repainting their fence a pale shade of green.",
    "The bus was late again, so I walked the last two miles.",
    "He forgot his keys and had to wait for the landlord.",
    "We spent the whole Sunday cleaning out the garage.",
    "My grandmother still writes letters by hand every week.",
    "The washing machine makes a strange noise during the spin cycle.",
    "Please remember to water the plants while I am away.",
    "The children built a fort out of cushions and blankets.",
    "I can never find a matching pair of socks in the morning.",
    "The dog barks at every delivery van that stops outside.",
    "They moved to a smaller flat closer to the city centre.",
    "Dinner will be ready in about twenty minutes.",
    "The lift is out of order, so take the stairs.",
    "He set three alarms and still overslept.",
    "Her cat knocks things off the table when it wants attention.",
    "The new sofa is much more comfortable than the old one.",
    # food and cooking
    "Whisk the eggs with a pinch of salt before adding the flour.",
    "The soup needs to simmer for at least an hour.",
    "Fresh basil loses its flavour quickly once it is chopped.",
    "Sourdough bread takes two days to make from start to finish.",
    "This restaurant serves the best dumplings in town.",
    "Let the dough rest in the fridge overnight.",
    "Roast the vegetables at a high temperature until they caramelise.",
    "He added too much chilli and nobody could finish the curry.",
    "A squeeze of lemon brightens almost any fish dish.",
    "The bakery on the corner sells out of croissants by nine.",
    "Use a sharp knife; a blunt one is more likely to slip.",
    "The recipe calls for brown sugar, but honey works just as well.",
    "Cold butter makes the pastry flaky.",
    "We ordered far too much food for four people.",
    "Green tea should be brewed with water just below boiling.",
    "The cheese board came with grapes, walnuts and fig jam.",
    "She taught herself to cook by watching old television shows.",
    "Season the steak generously and let it come to room temperature.",
    "Is there a vegetarian option on the menu?",
    "The coffee here is strong enough to wake the dead.",
    # science
    "Water boils at a lower temperature at high altitude.",
    "Photosynthesis converts light energy into chemical energy.",
    "The speed of light in a vacuum is about three hundred thousand kilometres per second.",
    "DNA carries the genetic instructions for the development of living organisms.",
    "Black holes bend light so strongly that nothing can escape from inside the horizon.",
    "Vaccines train the immune system to recognise a specific pathogen.",
    "The periodic table arranges elements by their atomic number.",
    "Plate tectonics explains why earthquakes cluster along certain boundaries.",
    "Bees communicate the location of flowers through a waggle dance.",
    "Entropy in an isolated system never decreases over time.",
    "The human brain contains roughly eighty-six billion neurons.",
    "Antibiotics are ineffective against viral infections.",
    "Saturn's rings are made mostly of ice and rock.",
    "Electrons occupy orbitals with distinct energy levels.",
    "A catalyst speeds up a reaction without being consumed by it.",
    "The ocean absorbs a large share of the carbon dioxide we emit.",
    "Mitochondria produce most of the cell's supply of energy.",
    "Sound travels faster through water than through air.",
    "The experiment was repeated three times to rule out contamination.",
    "Measurements showed a small but significant increase in temperature.",
    # technology and computing
    "The update fixed a bug that caused the app to crash on startup.",
    "Always back up your files before installing a new operating system.",
    "The server ran out of memory during the nightly batch job.",
    "Neural networks learn by adjusting weights to reduce a loss function.",
    "Quantization stores numbers with fewer bits to save memory and time.",
    "The compiler rejected the code because of a missing semicolon.",
    "Two-factor authentication makes stolen passwords much less useful.",
    "The battery drains quickly when the screen brightness is high.",
    "Open source software lets anyone read and modify the code.",
    "The database query took several minutes on the large table.",
    "Our website went down for an hour after the certificate expired.",
    "A graphics card can multiply large matrices very quickly.",
    "He wrote a short script to rename thousands of photos.",
    "The printer is jammed again, and nobody knows how to fix it.",
    "Cloud storage makes it easy to share documents with colleagues.",
    "The robot vacuum got stuck under the bed.",
    "Latency matters more than bandwidth for online games.",
    "She spent the afternoon debugging a race condition.",
    "The keyboard shortcut saves a surprising amount of time.",
    "Machine translation has improved dramatically in recent years.",
    # history and society
    "The Roman Empire built roads that are still used today.",
    "The printing press made books affordable for ordinary people.",
    "Women won the right to vote in many countries during the twentieth century.",
    "The Great Wall was built over many centuries by different dynasties.",
    "The industrial revolution began in Britain in the late eighteenth century.",
    "Ancient Egyptians preserved their dead through mummification.",
    "The fall of the Berlin Wall marked the end of an era.",
    "Many medieval towns grew up around markets and river crossings.",
    "The museum holds a collection of coins from the Byzantine period.",
    "Historians disagree about the causes of the war.",
    "The city council voted to expand the public library.",
    "Elections are held every four years in this country.",
    "The new law protects workers who report safety violations.",
    "Volunteers cleaned the beach after the storm.",
    "Public transport is free for students and pensioners.",
    "The protest remained peaceful throughout the afternoon.",
    "Literacy rates have risen sharply over the past century.",
    "The treaty was signed by twelve nations in Geneva.",
    "Local farmers sell their produce at the Saturday market.",
    "The census counts every resident once every ten years.",
    # nature and weather
    "Heavy rain is expected across the north tonight.",
    "The leaves turn red and gold in early October.",
    "A thick fog rolled in from the sea before dawn.",
    "The river burst its banks after a week of storms.",
    "Snow fell quietly over the mountains all night.",
    "The desert is cold at night despite the heat of the day.",
    "Migrating geese fly south in a long V formation.",
    "The forest floor was covered with moss and ferns.",
    "Lightning struck the old oak tree in the park.",
    "It has been the driest summer on record.",
    "The tide goes out far enough to walk to the island.",
    "Wild strawberries grow along the edge of the path.",
    "A rainbow appeared as soon as the sun came out.",
    "The lake freezes solid during the coldest weeks of winter.",
    "Wolves were reintroduced to the national park in the nineties.",
    "The wind was so strong that it tore the tiles from the roof.",
    "Coral reefs are home to a quarter of all marine species.",
    "We watched the sunset from the top of the hill.",
    "The air smells of pine after the rain.",
    "Hailstones the size of marbles damaged several cars.",
    # travel
    "Our flight was delayed by three hours because of the weather.",
    "The hotel room had a view of the harbour.",
    "Do I need a visa to visit for two weeks?",
    "The night train arrives in Vienna shortly after seven.",
    "We rented bicycles and rode along the canal.",
    "Pack light; you can buy anything you forget.",
    "The old town is best explored on foot.",
    "He lost his passport on the last day of the trip.",
    "The ferry crossing took longer than we expected.",
    "Is breakfast included in the price of the room?",
    "The guidebook recommended a small café near the cathedral.",
    "They hiked for six days through the mountains.",
    "The border crossing was quick and friendly.",
    "I always get seasick on small boats.",
    "Taxis from the airport charge a fixed fare to the centre.",
    "The museum is closed on Mondays.",
    "We missed the last bus and had to walk back.",
    "The campsite was full, so we slept in the car.",
    "Exchange some money before you leave the airport.",
    "The view from the summit made the climb worthwhile.",
    # sports and games
    "The striker scored twice in the second half.",
    "She trains for the marathon six days a week.",
    "The match was postponed because the pitch was flooded.",
    "He has won the chess championship three years running.",
    "The crowd cheered as the runners crossed the finish line.",
    "Swimming is good exercise for people with bad knees.",
    "The referee showed a red card after the tackle.",
    "Our team lost the final on penalties.",
    "Cyclists climbed the steep pass in blazing heat.",
    "The tennis match lasted nearly five hours.",
    "She learned to ski when she was four years old.",
    "The coach made three substitutions at half time.",
    "Rowing requires strength, rhythm and perfect timing.",
    "They play board games every Friday evening.",
    "The goalkeeper saved a penalty in the final minute.",
    "Baseball season starts in early spring.",
    "He broke his wrist falling off a skateboard.",
    "The gym is busiest in the first weeks of January.",
    "Climbing indoors is a good way to learn the basics.",
    "The relay team set a new national record.",
    # work and money
    "The meeting has been moved to Thursday afternoon.",
    "Please send me the report by the end of the week.",
    "Interest rates rose for the third time this year.",
    "The company announced record profits despite the downturn.",
    "She negotiated a higher salary before accepting the offer.",
    "Inflation makes savings lose value over time.",
    "The start-up raised ten million dollars in its first round.",
    "Our office is switching to a four-day week as a trial.",
    "He runs a small bookshop that specialises in maps.",
    "The budget must be approved by the board.",
    "Shares fell sharply after the earnings report.",
    "Most employees now work from home two days a week.",
    "The invoice is overdue by thirty days.",
    "The factory will hire two hundred new workers.",
    "Rent takes up almost half of my monthly income.",
    "The bank charges a fee for international transfers.",
    "She quit her job to start her own design studio.",
    "Customer complaints dropped after the new policy.",
    "The contract runs for two years with an option to renew.",
    "Sales of electric cars have doubled since last year.",
    # health
    "Drink plenty of water when the weather is hot.",
    "The doctor recommended rest and a week off work.",
    "Regular exercise lowers the risk of heart disease.",
    "He has been allergic to peanuts since childhood.",
    "Getting enough sleep improves memory and mood.",
    "The pharmacy is open until midnight on weekdays.",
    "She sprained her ankle on the icy steps.",
    "The flu vaccine is offered free to people over sixty-five.",
    "Washing your hands is the simplest way to stop infections spreading.",
    "The clinic has a long waiting list for physiotherapy.",
    "Too much sugar is bad for your teeth.",
    "A short walk after lunch helps digestion.",
    "The nurse checked his blood pressure twice.",
    "Stress can cause headaches and trouble sleeping.",
    "Wear sunscreen even on cloudy days.",
    "The surgery went well and she is recovering at home.",
    "Some medicines should not be taken on an empty stomach.",
    "Meditation helps some people manage anxiety.",
    "The hospital opened a new children's ward.",
    "He gave up smoking after twenty years.",
    # arts and culture
    "The orchestra played Beethoven's fifth symphony.",
    "Her first novel was translated into thirty languages.",
    "The gallery is showing early photographs of the city.",
    "The film won best picture at the festival.",
    "He practises the violin for two hours every day.",
    "The play was so moving that half the audience was in tears.",
    "Impressionist painters tried to capture fleeting light.",
    "The band is touring Europe this summer.",
    "Poetry often says more in fewer words.",
    "The sculpture is carved from a single block of marble.",
    "The theatre was built in the eighteenth century.",
    "She sings in a choir that performs at Christmas.",
    "The documentary follows a family of farmers for a year.",
    "Jazz grew out of blues and ragtime in New Orleans.",
    "The library hosts a book club on the first Tuesday of every month.",
    "His paintings use bold colours and thick brushstrokes.",
    "The opera is sung in Italian with English subtitles.",
    "The author signed copies after the reading.",
    "Street art has transformed the old industrial district.",
    "The comedian's jokes fell flat with the late-night crowd.",
    # education and language
    "The exam covers everything from the first term.",
    "Learning a second language is easier as a child.",
    "The lecture was recorded and posted online.",
    "Students must submit their essays by Friday.",
    "Mathematics is the language of the physical sciences.",
    "The school library needs more books for young readers.",
    "He is studying for a degree in civil engineering.",
    "The teacher explained fractions using slices of pizza.",
    "English spelling is notoriously inconsistent.",
    "The university offers evening classes for adults.",
    "She won a scholarship to study abroad.",
    "Homework should reinforce what was learned in class.",
    "The dictionary added hundreds of new words this year.",
    "Children learn best when they are curious.",
    "The professor's office hours are on Wednesday mornings.",
    "Grammar rules have many exceptions.",
    "The thesis took him four years to complete.",
    "Reading aloud helps young children build vocabulary.",
    "The course is taught entirely in French.",
    "Group projects teach students to collaborate.",
    # questions, dialogue, opinions
    "What time does the pharmacy close on Sundays?",
    "Why is the sky blue during the day?",
    "How long does it take to get to the airport?",
    "Have you ever tried skydiving?",
    "Which way is the train station from here?",
    "Honestly, I think the sequel was better than the original.",
    "I'm not sure that's a good idea, but let's try it.",
    "Thanks so much for your help yesterday!",
    "Sorry, I didn't catch your name.",
    "Would you mind closing the window? It's freezing.",
    "That's the funniest thing I've heard all week.",
    "Wait, did you just say the meeting was cancelled?",
    "I completely agree with your point about the budget.",
    "Can you recommend a good book for a long flight?",
    "No way, that can't possibly be true.",
    "Let me know if you need anything else.",
    "Where did you buy that jacket?",
    "I'd rather stay in tonight and watch a film.",
    "Who left the lights on in the kitchen?",
    "Congratulations on your new job!",
    # longer and more complex sentences
    (
        "Although the forecast promised sunshine, we spent most of the holiday sheltering"
        " from the rain in small cafés."
    ),
    (
        "The committee, after months of debate, finally agreed on a plan that nobody "
        "particularly liked but everyone could accept."
    ),
    (
        "If the bridge had not been repaired in time, thousands of commuters would have "
        "faced a two-hour detour."
    ),
    (
        "Researchers found that people who slept less than six hours a night were more "
        "likely to catch a cold."
    ),
    "When the power went out, the whole street gathered outside with candles and folding chairs.",
    (
        "Despite its small size, the island has a remarkable variety of birds, many of "
        "which are found nowhere else."
    ),
    "The software, which had worked perfectly in testing, failed within minutes of going live.",
    (
        "She had always wanted to see the northern lights, so she booked a cabin in "
        "Lapland for the darkest week of the year."
    ),
    (
        "Because the recipe was written in imperial units, we had to convert every "
        "measurement before we could start."
    ),
    (
        "The museum's new wing, designed by a young architect, uses natural light to "
        "illuminate the sculptures."
    ),
    "Not every problem can be solved with more money, but many can be made easier.",
    "The old lighthouse keeper kept a detailed diary of every ship that passed for forty years.",
    "After the merger, the two companies struggled to combine their very different cultures.",
    (
        "It was only when he reached the station that he realised he had left his ticket "
        "on the kitchen table."
    ),
    (
        "Scientists hope the new telescope will reveal galaxies that formed shortly after"
        " the Big Bang."
    ),
    (
        "The village, once known for its pottery, now attracts tourists with its annual "
        "music festival."
    ),
    (
        "Although electric cars are cheaper to run, their higher purchase price still "
        "puts many buyers off."
    ),
    "The negotiations broke down late on Friday night, and both sides blamed the other.",
    "To everyone's surprise, the shy new student gave the most confident speech of the day.",
    (
        "The report concludes that the river will continue to rise unless upstream "
        "forests are protected."
    ),
    # numbers, names, and technical fragments
    "The package weighs 2.5 kilograms and costs $19.99 to ship.",
    "Flight BA 117 departs from Terminal 5 at 10:45.",
    "The population grew from 1.2 million in 1990 to 2.8 million in 2020.",
    "Call 555-0198 to book an appointment.",
    "The temperature dropped to minus 15 degrees Celsius overnight.",
    "Section 4.2 describes the experimental setup in detail.",
    "Version 3.1 of the library drops support for Python 2.",
    "The marathon distance is 42.195 kilometres.",
    "Dr. Patel will see you at half past three.",
    "The meeting is in room B-204 on the second floor.",
    "Mount Everest is 8,849 metres above sea level.",
    "The score was 3-1 at the end of extra time.",
    "Her email address ends in .edu because she works at a university.",
    "The recipe serves 4 and takes about 45 minutes.",
    "Paris, London and Berlin are all within a day's train ride of each other.",
    "The function returns None if the key is missing.",
    "Tokyo hosted the Olympic Games in 1964 and again in 2021.",
    "The warranty covers parts and labour for 24 months.",
    "Use the HTTPS version of the site for a secure connection.",
    "Her ID number is printed on the back of the card.",
)


def calibration_sentences() -> list[str]:
    """The calibration half: sentences at even positions."""
    return list(SENTENCES[0::2])


def evaluation_sentences() -> list[str]:
    """The evaluation half: sentences at odd positions (never seen by the quantizer)."""
    return list(SENTENCES[1::2])
