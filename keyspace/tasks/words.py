"""The word list behind NIAH keys and word values, common-words extraction and coded words.

Concrete English nouns, hand-picked so that no word is an inflection of another (a whole-word match
never confuses "attack" with "attacks"). Fixed here, not read from a corpus, so prompts are the same
on every machine and Python version.
"""

from __future__ import annotations

_WORDS = """
aardvark alligator alpaca anchovy ant antelope armadillo badger barracuda bat beaver bee beetle
bison boar buffalo bull butterfly camel canary caribou cat caterpillar cheetah chicken chipmunk
cobra cod condor cougar cow coyote crab crane cricket crocodile crow deer dingo dog dolphin donkey
dove dragonfly duck eagle eel elephant elk emu falcon ferret finch flamingo fox frog gazelle gecko
gerbil gibbon giraffe goat goose gorilla grasshopper gull hamster hare hawk hedgehog heron herring
hippo hornet horse hummingbird hyena iguana impala jackal jaguar jellyfish kangaroo kingfisher
kiwi koala ladybug lemur leopard lion lizard llama lobster lynx macaw magpie mackerel manatee
marmot meerkat mink mole mongoose monkey moose mosquito moth mouse mule narwhal newt octopus
opossum orca ostrich otter owl ox oyster panda panther parrot peacock pelican penguin pheasant pig
pigeon piranha platypus pony porcupine possum puffin puma quail rabbit raccoon ram rat raven
reindeer rhino robin salamander salmon sardine scorpion seal shark sheep shrimp skunk sloth snail
snake sparrow spider squid squirrel starfish stingray stork swallow swan tapir termite tiger toad
tortoise toucan trout tuna turkey turtle viper vulture walrus wasp weasel whale wolf wombat
woodpecker worm yak zebra
almond apple apricot avocado bagel banana barley basil bean beet biscuit blueberry bread broccoli
butter cabbage cake candy carrot cashew celery cereal cheese cherry chestnut chili chocolate
cinnamon coconut coffee cookie corn cracker cranberry cream cucumber cupcake curry date donut
dumpling eggplant fig flour garlic ginger grape grapefruit guava hazelnut honey jam jelly kale
ketchup lemon lentil lettuce lime mango maple melon mint muffin mushroom mustard noodle nutmeg oat
olive onion orange oregano pancake papaya paprika parsley pasta peach peanut pear pepper pickle
pie pineapple pistachio pizza plum popcorn potato pretzel pudding pumpkin quinoa radish raisin
raspberry rice saffron salad salsa sandwich sausage soup spinach squash strawberry sugar syrup
taco tea toast tofu tomato turnip vanilla vinegar waffle walnut watermelon wheat yogurt zucchini
anvil axe basket bathtub battery bed bell bench blanket blender bottle bowl box broom brush bucket
cabinet calendar camera candle carpet chair chisel clock compass couch cradle cup curtain cushion
desk drawer drill envelope fan faucet fork freezer funnel globe glove hammer hanger helmet hook
iron jar kettle key knife ladder lamp lantern ledger lock magnet mallet mattress microscope mirror
mop mug napkin needle notebook oven padlock pail pan pencil pillow pitcher plate pliers pot quilt
radio rake razor ribbon rope ruler saucer saw scissors screw shelf shovel sieve sink soap sofa
spatula sponge spoon stapler stool stove table teapot telescope thermos thimble toaster towel tray
trowel trunk umbrella vase wallet wardrobe whistle wrench
avalanche bay beach boulder breeze brook canyon cave cliff cloud comet coral creek crystal delta
desert dune dust earthquake forest fossil frost galaxy geyser glacier gravel harbor hill horizon
island jungle lagoon lake lava leaf marsh meadow meteor mist moon moss mountain nebula ocean
orchard pebble peninsula planet plateau pond prairie puddle quartz rain rainbow reef ridge river
rock sand savanna shore sky snow soil spring star storm stream summit sun swamp thunder tide
tornado tree tundra valley volcano waterfall wave wind
accordion banjo bagpipe bassoon cello clarinet cymbal drum flute gong guitar harmonica harp
harpsichord kazoo lute mandolin oboe organ piano piccolo saxophone sitar tambourine trombone
trumpet tuba ukulele viola violin xylophone
apron belt beret blazer blouse boot bracelet cap cardigan cloak collar corset crown earring
glasses gown hat hoodie jacket jeans kimono necklace overalls pajamas parka poncho robe sandal
scarf shawl shirt shoe skirt slipper sneaker sock suit sweater tie tuxedo vest
airport bakery bank barn bridge castle cathedral chapel cinema clinic cottage courthouse dam
factory farm fortress garage garden gym hangar hospital hotel igloo kiosk library lighthouse
mansion market mill monastery museum palace pavilion pier prison pyramid quarry ranch school shed
stadium studio subway supermarket temple theater tower tunnel university warehouse windmill zoo
airplane ambulance bicycle blimp boat bulldozer bus canoe carriage cart ferry glider helicopter
jeep kayak limousine locomotive motorcycle raft rocket sailboat scooter sled spaceship submarine
taxi tractor trailer tram truck unicycle van wagon yacht
acrobat architect astronaut baker barber blacksmith butcher captain carpenter chef chemist clown
cowboy dentist detective diver doctor drummer editor electrician engineer farmer firefighter
fisherman gardener geologist guard hunter janitor jeweler journalist judge knight lawyer librarian
lifeguard magician mechanic miner musician nurse painter pharmacist photographer pilot plumber
poet potter priest professor sailor scientist sculptor shepherd singer soldier surgeon tailor
teacher waiter weaver writer
aluminum amber bamboo brass bronze canvas cardboard cement chalk clay copper cotton denim diamond
emerald fabric feather glass gold granite graphite ivory jade leather linen marble nickel nylon
pearl plastic platinum porcelain rubber ruby sapphire silk silver slate steel stone timber tin
topaz velvet wax wool
anthem atlas ballad banner blueprint comic diary dictionary encyclopedia fable flag journal legend
letter map magazine manual medal memo menu myth novel painting parade passport poem portrait
postcard poster puzzle recipe riddle saga sketch sonnet statue story ticket trophy
"""

WORDS: tuple[str, ...] = tuple(_WORDS.split())
