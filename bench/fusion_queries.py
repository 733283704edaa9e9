"""Known-item queries over the demo corpus (``build_corpus`` defaults, as ``heimdex demo`` loads it).

Each query is a hand-written paraphrase of one scene as a user remembers it: mostly something said and
something seen. Its target is the one READY scene of the asking owner whose text (transcript, visual
description, tags, summary) holds every evidence phrase; ``bench/fusion.py`` refuses to run when a set of
phrases matches no scene or several, so a change to the corpus cannot silently move a target.

Kinds: "shared" queries reuse some of the scene's own words; "synonym" queries avoid its content words
(only function words and numbers may coincide).
"""

from typing import NamedTuple


class KnownItem(NamedTuple):
    owner: int  # index of the demo owner who asks: 0 Northwind, 1 Lakeside, 2 Summit
    kind: str  # "shared" or "synonym"
    query: str
    evidence: tuple[str, ...]  # phrases (case-insensitive) that together pick the target scene


# "OWNER KIND: query", then "  = evidence | evidence"; "#" lines are comments.
_ITEMS = """\
# Northwind Documentaries: harbor, mountains, bakery, museum, cycling, football, lab
0 synonym: an old sailor in a mustard raincoat dragging in the mesh, the vessel's storage nearly loaded by 7 am
  = half full of mackerel | yellow oilskins
0 synonym: a horned whale popping up next to a slab of frozen sea
  = narwhal
0 shared: harbour master's tide board by the slipway and crates of mackerel on ice
  = chalkboard | crates of silver mackerel
0 shared: seagulls over a trawler heading past the lighthouse, tide times on a chalkboard
  = lighthouse | chalkboard
0 synonym: setting out at sunrise on an 11 km ascent, an icefield below sheer rock walls
  = eleven kilometres | pale blue glacier
0 shared: hikers signing the old logbook in a metal box by the stone cairn on the summit
  = logbook | stone cairn
0 synonym: levain fizzing in a pot on the window ledge; forming the round so its skin stays taut but intact
  = glass jar | Shaping is the tricky part
0 shared: baker sliding loaves into a brick oven at 250 degrees with a tray of water for steam
  = two hundred and fifty | brick oven
0 synonym: a crimson mug of strong brew with a teaspoon; she explains forming the round so it doesn't rip
  = Shaping | espresso
0 synonym: people gathered round an ornate sarcophagus; staff control the air's moisture so antique charts don't split
  = humidity | Egyptian coffin
0 shared: basement archive shelves of labelled boxes, then the clock gallery wound every Monday
  = clock gallery | labelled boxes
0 synonym: an old aeroplane hung overhead that unpaid helpers spent over a decade fixing, in a former streetcar shed
  = volunteers | tram depot | biplane suspended
0 synonym: a mum on a freight trike carrying her youngsters; riders receive a head start at the signals
  = green light a few seconds | woman pedalling
0 shared: the number of riders barely drops when it rains; a traffic light with a bicycle symbol
  = rains | traffic light with
0 synonym: office workers in waterproofs on the segregated cycleway by the water early one weekday
  = Tuesday | rain jackets
0 synonym: the keeper rooted to the spot as the set play bends over the defenders; a flying save
  = free kick curls over the wall | goalkeeper diving
0 shared: the manager's half-time plan to press high, players contesting a header under floodlights
  = north stand | floodlit
0 synonym: a late leveller nodded in from close range while supporters swing banners and knitted mufflers
  = seventy-eighth | Early pressure | scarves
0 shared: gloved hand pipetting blue liquid into test tubes, checking the fume hood pulls air
  = fume hood is actually pulling | pipetting
0 synonym: a whirling separator with the cover up; trials usually go wrong initially and learners gain more from that
  = fail the first time | benchtop centrifuge
0 synonym: a chemist in protective eyewear studying a chart on screen; biomolecules split apart at 12,000 rpm
  = revolutions | graph on a computer
# Lakeside Media: jazz, allotment, night train, wetlands, council, marathon, pottery
1 shared: double bass player and pianist trading glances; the pianist's waltz written on a train
  = Lisbon | double bass player
1 synonym: a cosy venue with flickering wax lights on each bistro top; bands performing each evening for six decades
  = Candlelit
1 synonym: a visiting artist coaxes a wailing electronic tone from nothing, palms hovering by a metal rod
  = theremin
1 shared: saxophonist under a warm spotlight; no set list, the leader calls tunes with a nod
  = no set list tonight | saxophonist playing under
1 shared: crushed eggshells against slugs, the neighbour's cat asleep on the compost, tomato seedlings
  = cat from the houses | Tomato seedlings
1 synonym: an emerald-eyed striped kitty staring at the lens; tips for novices on which crops to raise
  = catalogue | tabby
1 shared: a wheelbarrow of crumbly compost beside a raised bed
  = wheelbarrow full
1 synonym: the buffet carriage with linen cloths and little lights; the beef stew passengers travel for
  = goulash | white tablecloths
1 shared: the night train leaves the capital at nine forty; a locomotive at a small border station
  = nine forty | locomotive standing
1 synonym: woods flashing by the carriage glass at daybreak as the railway hugs the shore for the final stretch
  = along the lake | Forested hills
1 shared: black silhouette of a horse on a sign; otters came back once the river was cleaned up
  = Otters | silhouette
1 synonym: a still, slate-coloured wader amid the rushes; wardens tallied 41 breeding sites this season
  = forty-one nests | grey heron
1 synonym: a huge skein of honking waterfowl taking to the air from a drowned pasture at daybreak
  = flock of geese
1 synonym: a woman at the mic clutching notes; the garage is cramped for battery-powered coaches
  = electric fleet | microphone
1 shared: projected slide of the depot site map; sharing the charging equipment with the fire station
  = fire station | projected slide
1 synonym: elected members at a horseshoe desk in an oak-lined room; hundreds of complaints about din and congestion
  = objections | curved table
1 shared: volunteers holding out paper cups of water as the lead pack shrinks to six
  = lead pack | paper cups
1 synonym: reserves give out near 30 km; a champion breasting the ribbon, hands aloft
  = hit the wall | finish tape
1 shared: spectators with handmade signs on a cobbled street, runners hitting the wall at thirty
  = hit the wall | handmade signs
1 synonym: moist palms coaxing a slender vessel upward on the rotating disc; the coating fires to jade in the furnace
  = celadon | Wet hands
1 shared: glazed green vases in an open kiln; she opens the clay with her thumbs and pulls the walls
  = thumbs | Glazed green vases
1 synonym: a cutting strand through a lump of earthenware; pieces left seven days before their feet are shaved
  = leather-hard | wire tool
# Summit Studios: spaceport, harbor, mountains, bakery, museum, cycling, football
2 shared: rocket climbing on orange flame with a weather satellite to watch for hurricanes
  = payload | orange flame
2 synonym: onlookers on the sand gesturing at the contrail; high-altitude gusts at the threshold
  = upper-level winds | Spectators on a beach
2 synonym: controllers at their desks in a darkened hall as the thunder of the ascent hits your ribcage
  = liftoff | consoles
2 shared: fisherman in yellow oilskins hauling a green net, boats warming up at four in the morning
  = four in the morning | yellow oilskins
2 shared: the winch broke so the crew hauls nets by hand; seagulls above a trawler and a lighthouse
  = winch | lighthouse
2 synonym: boxes of silvery sea creatures chilled at the dock; a veteran seaman on how the takings shifted
  = Crates | old fisherman explains
2 synonym: walkers with rucksacks perched on rocks at a gusty pass; an 11 km route with 900 m of ascent
  = eleven kilometres | backpacks resting
2 shared: above the tree line the wind picks up so we put on another layer; a pale blue glacier
  = another layer | pale blue glacier
2 synonym: boules with slashed crowns on a wire grid, the bake snapping and popping as it shrinks
  = crackle | scored tops
2 shared: flour-dusted hands folding dough on a wooden bench instead of kneading
  = kneading | Flour-dusted
2 synonym: a dirigible's cabin suspended indoors, once flown over the ocean between the wars
  = zeppelin
2 shared: why the mummy's case is painted inside, under a restored biplane suspended from the roof
  = mummy | biplane suspended
2 synonym: a specialist with a magnifier dusting an ancient pebble picture underfoot; most holdings hidden downstairs
  = ninety percent | magnifying lamp
2 shared: a multi-storey garage packed with bikes; the protected bike lane full at eight fifteen
  = Tuesday | multi-storey
2 synonym: a mother reckons her freight cycle beats the pupils' coach; people in waterproofs pedalling by the canal
  = Marta | rain jackets
2 shared: referee holding up a yellow card to a player with hands on hips after early pressure
  = Early pressure | referee holding up
2 synonym: supporters swinging banners and knitted mufflers; a late effort cleared and honours shared
  = stoppage | scarves
"""


def _parse(text: str) -> tuple[KnownItem, ...]:
    items, head = [], ""
    for line in text.splitlines():
        if line.startswith("  = "):
            owner, kind = head.split(":", 1)[0].split()
            evidence = tuple(e.strip() for e in line[4:].split("|"))
            items.append(KnownItem(int(owner), kind, head.split(":", 1)[1].strip(), evidence))
        elif not line.startswith("#"):
            head = line
    return tuple(items)


KNOWN_ITEMS = _parse(_ITEMS)
