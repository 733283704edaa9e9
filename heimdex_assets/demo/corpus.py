"""A deterministic sample corpus (owners, videos, scenes, persons, photos) and its loader.

Every id is a uuid5 of DEMO_NAMESPACE and a readable name, every timestamp is fixed, and every image is
either a bundled scikit-image photograph or rendered with PIL, so the same arguments give the same corpus,
the same files and the same hashes.
"""

import hashlib
import io
import os
import random
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont
from sqlalchemy import Connection, Table, func, tuple_
from sqlalchemy.dialects.postgresql import insert

from heimdex_assets.db import tables

DEMO_NAMESPACE = uuid.UUID("6f1d3c5e-2b7a-5e4f-9c8d-0a1b2c3d4e5f")
BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)
THUMB_SIZE = (320, 180)

# Data blocks: "@ head | fields", then "- " transcript sentences, "* description | tags", "= " summaries.
# Topics: "@ key | title | gradient colours | bundled photograph without people that fits, or -".
_TOPIC_TEXT = """\
@ harbor_fishing | Harbor Fishing at Dawn | #283c5a #c8aa78 | -
- We're down at the harbor just after four in the morning, and the first boats are already warming up.
- Tomasz has fished these waters for thirty years, and he says the cod move further out every decade.
- The crew hauls the nets by hand, because the winch broke last winter and nobody could afford the part.
- Gulls follow the boat the whole way out, waiting for anything that gets thrown back over the side.
- By seven the hold is half full of mackerel, which is a good morning by anybody's standards.
- On the quay the catch is weighed, packed in ice and sold to the restaurants before most people wake.
- The harbor master keeps a chalkboard of tide times by the slipway, and everybody checks it twice.
* Small wooden fishing boats moored in a grey harbor at dawn, mist on the water. | harbor, boats, dawn, mist
* A fisherman in yellow oilskins hauls a green net over the side of the boat. | fisherman, net, boat
* Crates of silver mackerel packed in crushed ice on a wet concrete quay. | fish, mackerel, quay, ice
* Seagulls wheel above the stern of a trawler heading out past the lighthouse. | seagulls, trawler, sea
= A fishing crew leaves the harbor before dawn and returns with a hold full of mackerel.
= An old fisherman explains how the harbor's catch has changed over thirty years.
@ mountain_hiking | Ridge Walk in the High Mountains | #466ea0 #e6ebf0 | -
- We set off from the trailhead at first light, with eleven kilometres and nine hundred metres of climbing.
- The path zigzags through pine forest for the first hour, and it's steeper than the map suggests.
- Above the tree line the wind picks up, so this is where we stop and put on another layer.
- You can see three glaciers from the saddle, though the guide says they were twice this size in her youth.
- The last section to the summit is a scramble over loose rock, so test every handhold.
- At the top there's a cairn and a metal box with a logbook that hikers have signed since the fifties.
- Coming down is harder on the knees than going up, and that's when most people twist an ankle.
* A narrow dirt trail winding up a green slope toward jagged snowy peaks. | mountains, trail, hiking, snow
* Hikers with backpacks resting on boulders at a windy saddle between two summits. | hikers, backpacks
* A stone cairn on a rocky summit under a deep blue sky, clouds below. | summit, cairn, rocks, sky
* A pale blue glacier filling a valley beneath steep grey cliffs. | glacier, valley, cliffs, ice
= Hikers climb through pine forest and over loose rock to a summit with a view of three glaciers.
= A mountain guide describes how the glaciers below the ridge have shrunk.
@ bread_baking | Sourdough at the Corner Bakery | #78461e #f5e1b4 | coffee
- The starter was fed last night, and it has doubled and is full of bubbles, which means it's ready.
- We mix the flour and water and let it rest for an hour before the salt goes in; that's the autolyse.
- Instead of kneading, every half hour she stretches the dough and folds it over itself, four times.
- Shaping is the tricky part, because you want tension on the surface without tearing the dough.
- The loaves prove overnight in the cold room, which gives the crumb that slightly sour flavour.
- The oven is at two hundred and fifty degrees, and a tray of water underneath makes steam for the crust.
- Listen to that crackle as the bread cools; the crust is contracting, and it's the best sound here.
* Flour-dusted hands folding a pale ball of dough on a wooden bench. | dough, flour, bread, kitchen
* Round sourdough loaves with scored tops cooling on a metal rack. | sourdough, loaf, bakery, crust
* A baker slides loaves into a deep brick oven with a long wooden peel. | oven, baker, bread, fire
* A glass jar of bubbling sourdough starter on a sunny windowsill. | starter, jar, fermentation
= A baker takes a sourdough from bubbling starter to crackling loaf over two days.
= The bakery explains stretching, folding and a long cold prove instead of kneading.
@ museum_tour | Behind the Scenes at the City Museum | #5a3c32 #dcc8aa | -
- Welcome to the east wing, which was the city's tram depot before it became the museum.
- This biplane hanging from the ceiling was restored by volunteers over eleven years.
- Our curator keeps the humidity at fifty percent in this gallery, because the old maps would crack.
- Children always ask why the mummy's case is painted on the inside too; it was meant for the afterlife.
- In the conservation studio a technician cleans a Roman mosaic one tile at a time with a soft brush.
- Most of the collection is never on display; about ninety percent sits in the storage rooms beneath us.
- The last stop is the clock gallery, where every clock is wound by hand each Monday morning.
* A restored biplane suspended from the glass roof of a bright exhibition hall. | museum, biplane, gallery
* Visitors standing around a glass case holding a painted Egyptian coffin. | museum, egypt, exhibit
* A conservator with a magnifying lamp cleaning a colourful floor mosaic. | conservation, mosaic, restoration
* Rows of grey storage shelves filled with labelled boxes in a basement archive. | archive, storage, boxes
= A guided tour of the city museum, from a restored biplane to the hand-wound clock gallery.
= Museum staff show the conservation studio and the storage rooms visitors rarely see.
@ city_cycling | Commuting by Bike Through the City | #1e785a #e6e678 | -
- It's eight fifteen on a Tuesday and the new protected bike lane on the river road is already full.
- The city added two hundred kilometres of cycle paths in four years, and bike trips have tripled.
- At this junction cyclists get their own green light a few seconds before the cars.
- Marta rides a cargo bike with two kids in the front box, and she says it's faster than the school bus.
- The hardest part is still the hill by the cathedral, so many commuters have switched to electric bikes.
- Bike parking at the central station holds three thousand bicycles and is nearly full by nine.
- When it rains the number of riders drops by only about a fifth, which surprised the city planners.
* Cyclists in rain jackets riding along a green-painted bike lane beside a river. | cycling, bike lane, city
* A woman pedalling a cargo bike with two children sitting in the front box. | cargo bike, family
* A multi-storey bicycle garage packed with hundreds of parked bikes. | bike parking, station
* A traffic light with a small bicycle symbol glowing green at a busy junction. | traffic light, junction
= Commuters ride the city's new protected bike lanes, from cargo bikes to electric bikes.
= City planners explain how cycle paths tripled the number of bike trips.
@ football_match | Derby Day: Football Match Highlights | #146e28 #c82828 | -
- The derby kicks off in front of a sold-out crowd, and the noise from the north stand is deafening.
- Early pressure from the home side, a long ball over the top, and the keeper comes off his line.
- A foul on the edge of the area, and the referee shows a yellow card after a long look.
- The free kick curls over the wall and into the top corner; the goalkeeper didn't even move.
- At half-time the manager tells us the plan was to press high and make them play it long.
- An equaliser in the seventy-eighth minute, a header at the near post, and the away end erupts.
- Four minutes of stoppage time, a last chance blocked on the line, and it finishes one all.
* Players in red and blue shirts contesting a header on a floodlit pitch. | football, match, stadium
* A packed stand of fans waving scarves and flags behind the goal. | fans, stadium, crowd, scarves
* A goalkeeper diving full stretch as the ball curls into the top corner. | goalkeeper, goal, free kick
* A referee holding up a yellow card to a player with his hands on his hips. | referee, yellow card
= A city derby ends one all after a curling free kick and a late headed equaliser.
= The home manager explains the pressing game plan at half-time.
@ science_lab | A Day in the Chemistry Lab | #e6f0fa #285ab4 | -
- Every experiment starts with goggles, gloves and a check that the fume hood is actually pulling air.
- This solution turns from clear to deep blue as the copper ions bind, so we know the reaction worked.
- The centrifuge spins the samples at twelve thousand revolutions per minute to separate the proteins.
- Dr Okafor's group is trying to build a catalyst that splits water using nothing but sunlight.
- Half the job is keeping a good notebook; if you didn't write it down, it didn't happen.
- The mass spectrometer runs overnight, and in the morning we get a peak for every molecule.
- Most experiments fail the first time, and students learn more from those than from the ones that work.
* A gloved hand pipetting blue liquid into a row of small test tubes. | laboratory, pipette, chemistry
* Glass flasks bubbling under a fume hood in a bright white laboratory. | lab, flasks, fume hood
* A researcher in safety goggles reading a graph on a computer monitor. | scientist, data, goggles
* A benchtop centrifuge with its lid open, sample tubes arranged in a ring. | centrifuge, samples
= Chemists run experiments from copper solutions to a sunlight-driven catalyst.
= A research group shows the centrifuge, the mass spectrometer and the value of a good notebook.
@ jazz_concert | Late Night at the Jazz Club | #28143c #d28c28 | -
- The quartet opens with a slow ballad, just brushes on the snare and a walking bass line underneath.
- Our pianist wrote this next tune on a train to Lisbon, in a waltz time that keeps tripping people up.
- The saxophone solo goes on for three full choruses, and the room goes completely quiet.
- Between sets the bassist tells us the club has hosted live music every night since nineteen sixty-four.
- The drummer trades fours with the trumpet, faster and faster until they both start laughing.
- There's no set list tonight; the leader just calls the tunes by nodding at the band.
- The last number is an old standard, and half the audience sings the melody back to the horn.
* A saxophonist playing under a warm spotlight on a small club stage. | jazz, saxophone, concert, stage
* A double bass player and a pianist exchanging glances in a dim room. | double bass, piano, jazz band
* Candlelit tables packed close together in front of a brick-walled stage. | jazz club, audience
* Close-up of a drummer's brushes sweeping across a snare drum. | drums, brushes, rhythm, music
= A jazz quartet plays two sets of ballads and standards in a candlelit club.
= The band trades solos and calls tunes without a set list.
@ gardening | The Allotment in Early Spring | #3c8232 #aa7846 | chelsea
- The soil is finally warm enough to sow, so today it's broad beans, carrots and two rows of lettuce.
- Before planting, she digs in a barrow of compost that's been rotting down since the autumn.
- Tomatoes stay in the greenhouse for now, because a single late frost would kill every seedling.
- Slugs are the main enemy here, and she swears by a ring of crushed eggshells around each plant.
- The neighbours share tools and seeds, and the waiting list for a plot is now over three years.
- Her tip for beginners is to grow what you actually like eating, not what looks good in the catalogue.
- A cat from the houses next door supervises every weekend and sleeps on the warm compost bin.
* Neat rows of green seedlings in dark soil on a sunny allotment. | garden, seedlings, allotment
* A wheelbarrow full of crumbly compost next to a wooden raised bed. | compost, wheelbarrow, gardening
* Tomato seedlings in small pots on the shelves of a glass greenhouse. | greenhouse, tomatoes
* A watering can and a trowel resting on a path between vegetable beds. | garden tools, vegetables
= A gardener sows the first vegetables of spring on her allotment.
= Allotment holders share tips on compost, slugs and late frosts.
@ train_journey | By Rail Across the Mountains | #961e1e #f0d2a0 | -
- The night train leaves the capital at nine forty, and by ten most passengers are in their bunks.
- This line was built in the eighteen nineties, and some of the tunnels were dug entirely by hand.
- In the dining car the menu hasn't changed in years, and the goulash is why people book this route.
- We cross the viaduct at dawn, sixty metres above the river, and everyone crowds to the windows.
- The conductor has worked this route for twenty-two years and knows the regular passengers by name.
- At the border the train stops for twenty minutes while the locomotive is changed.
- The last hour runs along the lake, so close to the water you could almost touch it.
* A red passenger train crossing a tall stone viaduct above a misty river valley. | train, viaduct, railway
* Forested hills rushing past a compartment window at sunrise. | train window, landscape, sunrise
* A dining car with white tablecloths and small table lamps. | dining car, train, restaurant
* A locomotive standing at a small border station under a clear sky. | locomotive, station
= A night train crosses the mountains, over a high viaduct and along a lake.
= The conductor and the dining car staff describe life on a historic railway line.
@ wildlife_wetlands | Wildlife of the Wetlands | #3c5a3c #a0bed2 | horse
- At first light the marsh is full of sound: frogs, reed warblers, and a bittern booming like a foghorn.
- The herons nest together in the alder trees, and this year the rangers counted forty-one nests.
- Half-wild horses graze the reed beds and keep the vegetation low enough for the wading birds.
- The water level is managed with sluices that date back to the monks who drained this land.
- Otters came back to the reserve about ten years ago, after the river was cleaned up.
- From the hide you can watch kingfishers diving from the same branch again and again.
- In winter thousands of geese arrive from the north, and the noise when they take off is incredible.
* A grey heron standing motionless in shallow water among tall reeds. | heron, wetlands, reeds, bird
* A flock of geese lifting off a flooded meadow at sunrise. | geese, flock, marsh, sunrise
* A kingfisher perched on a branch above still brown water. | kingfisher, bird, river, wildlife
* Horses grazing in a reed bed with shallow pools reflecting the sky. | horses, marsh, grazing
= Rangers show the herons, otters and grazing horses of a restored wetland reserve.
= Thousands of geese arrive at the marsh for the winter.
@ council_meeting | Town Council Meeting: The New Bus Depot | #46465a #c8c8d2 | -
- The meeting is called to order at seven, and the first item is the proposed bus depot on Mill Lane.
- Residents have submitted more than three hundred written objections, mostly about noise and traffic.
- The transport officer argues that the current depot is too small for the new electric fleet.
- One councillor asks whether the charging equipment could be shared with the fire station next door.
- During public comments a retired teacher reads out a letter signed by the whole street.
- The budget for road repairs is approved without debate, which the chair says is a first this year.
- The vote on the depot is postponed to next month so the traffic study can be updated.
* Councillors seated around a curved table in a wood-panelled chamber. | council, meeting, town hall
* A resident speaking at a microphone with papers in her hand. | public comment, microphone
* A projected slide showing a site map of the proposed bus depot. | presentation, map, bus depot
* Members of the public filling rows of folding chairs at the back of the hall. | audience, public
= The town council debates a new bus depot and postpones the vote.
= Residents object to the depot's noise and traffic during public comments.
@ marathon | City Marathon Race Day | #f0781e #3c3ca0 | -
- Twelve thousand runners are in the start pens, and the elite women set off fifteen minutes ahead.
- The course loops twice through the old town, so the crowds see the leaders go past two times.
- At the twenty-kilometre mark the lead pack is down to six, running just under three minutes a kilometre.
- Volunteers at this water station have handed out forty thousand cups since the race began.
- Many people hit the wall around kilometre thirty, when the body runs out of stored energy.
- The winner crosses the line in two hours and twenty-one minutes, a course record by eight seconds.
- Hours later the last runners are still coming in, and the crowd cheers them just as loudly.
* A wave of runners in bright vests streaming across a bridge at the start. | marathon, runners, race
* Volunteers holding out paper cups of water at a roadside table. | water station, volunteers
* A runner breaking the finish tape with both arms raised. | finish line, winner, marathon
* Spectators with handmade signs cheering along a cobbled street. | crowd, spectators, old town
= Twelve thousand runners race through the old town and the winner sets a course record.
= Volunteers and spectators keep the marathon going until the last runner finishes.
@ pottery_workshop | Throwing Pots at the Pottery Workshop | #965a3c #d2c8b4 | -
- The clay has to be wedged first, pushed and folded like dough, to get all the air bubbles out.
- Centring the clay on the wheel takes longest to learn; if it's off centre, everything wobbles.
- Keep your elbows braced on your knees and let the wheel do the work.
- She opens the form with her thumbs and draws the walls up in three slow pulls.
- The pots dry for a week until they're leather-hard, and then the bases are trimmed.
- This glaze looks grey now, but in the kiln at twelve hundred degrees it turns a deep celadon green.
- Opening the kiln is always nerve-racking, because you never know what cracked during the firing.
* Wet hands shaping a tall cylinder of grey clay on a spinning potter's wheel. | pottery, clay, ceramics
* Rows of unfired bowls drying on wooden shelves in a dusty studio. | bowls, studio, ceramics
* Glazed green vases cooling on the shelf of an open kiln. | kiln, glaze, vases, ceramics
* A wire tool slicing a block of clay on a canvas-covered table. | clay, tools, workshop
= A potter wedges, centres and throws clay, then glazes and fires the pots.
= Students learn to centre clay on the wheel and open the kiln after a firing.
@ rocket_launch | Launch Day at the Spaceport | #0a143c #fa8c28 | rocket
- The rocket was rolled out to the pad overnight, and fuelling began about four hours before launch.
- Weather is the big question today, because the upper-level winds were right at the limit this morning.
- The countdown holds at T minus ten minutes while engineers check a sensor on the second stage.
- And we have liftoff; you feel the sound in your chest a few seconds after you see the flame.
- Two and a half minutes into the flight the first stage separates and heads back to the landing pad.
- The payload is a weather satellite that will watch the Atlantic for hurricanes.
- On the beach, families who drove through the night are still staring at the trail in the sky.
* A white rocket climbing on a column of orange flame above the launch tower. | rocket, launch, flame, liftoff
* A curving white exhaust trail across a pale blue morning sky. | exhaust trail, sky, launch
* Engineers seated at rows of consoles in a dim launch control room. | mission control, engineers
* Spectators on a beach pointing up at a rocket's vapour trail. | spectators, beach, rocket
= A weather satellite launches after a countdown hold, and the first stage returns to land.
= Engineers and spectators follow launch day from fuelling to liftoff.
"""
# Rare words, each in exactly one scene: "@ word | owner index | topic of the video it goes into".
_DISTINCTIVE_TEXT = """\
@ narwhal | 0 | harbor_fishing
- Past the breakwater the skipper cut the engine, and a narwhal surfaced beside the ice floe.
* A narwhal's long spiral tusk breaking the grey water beside a drifting ice floe. | narwhal, ice floe, arctic
@ theremin | 1 | jazz_concert
- Then the guest plays a theremin without touching it, hands waving in the air to bend each note.
* A performer waving her hands near the antennas of a theremin on a club stage. | theremin, instrument
@ zeppelin | 2 | museum_tour
- Up in the airship hall hangs the passenger gondola of a zeppelin that crossed the Atlantic in 1929.
* The silver gondola of a zeppelin hanging in a museum hall below a model airship. | zeppelin, airship
"""
# Bundled scikit-image photographs (no download): "@ loader name | key of the person shown, or -".
_PHOTO_TEXT = """\
@ astronaut | astronaut
* Portrait of a smiling woman in an orange flight suit, a flag and a model shuttle behind. | astronaut
@ camera | cameraman
* Black-and-white shot of a man in a dark coat filming with a camera on a tripod. | cameraman, camera, tripod
@ rocket | -
* A white rocket on the launch pad at dusk, floodlights between lightning towers. | rocket, launch pad, night
@ coffee | -
* An espresso in a red cup and saucer with a silver spoon on a wooden café table. | coffee, espresso, cafe
@ chelsea | -
* Close-up of a tabby cat with green eyes looking straight into the camera. | cat, tabby, pet, close-up
@ horse | -
* The black silhouette of a horse standing in profile on a white sign. | horse, silhouette
"""
# person key -> (name, loader, reference photos as (crop box (left, top, right, bottom), long side in px))
_PERSONS: dict[str, tuple[str, str, tuple[tuple[tuple[int, int, int, int], int], ...]]] = {
    "astronaut": ("Eileen Collins", "astronaut", (((90, 0, 370, 300), 300), ((140, 10, 320, 220), 320))),
    "cameraman": ("The Cameraman", "camera", (((100, 0, 350, 350), 320), ((130, 40, 300, 250), 300))),
}
_PERSON_SCENE_PHOTOS = ("astronaut", "camera")  # alternate in every real_photo_every-th scene
_OWNER_NAMES = ("Northwind Documentaries", "Lakeside Media", "Summit Studios")

_Visual = tuple[str, tuple[str, ...]]  # (description, tags)


class _Block(NamedTuple):
    head: list[str]
    sentences: tuple[str, ...]
    visuals: tuple[_Visual, ...]
    summaries: tuple[str, ...]


def _blocks(text: str) -> list[_Block]:
    parsed: list[tuple[list[str], dict[str, list[str]]]] = []
    for line in text.splitlines():
        if line.startswith("@ "):
            parsed.append(([part.strip() for part in line[2:].split("|")], {"-": [], "*": [], "=": []}))
        else:
            parsed[-1][1][line[0]].append(line[2:])
    blocks = []
    for head, lines in parsed:
        visuals = tuple(
            (d.strip(), tuple(t.strip() for t in tags.split(",")))
            for d, tags in (line.split("|") for line in lines["*"])
        )
        blocks.append(_Block(head, tuple(lines["-"]), visuals, tuple(lines["="])))
    return blocks


_TOPICS = _blocks(_TOPIC_TEXT)  # head: key, title, colours, photo
assert all(len(topic.sentences) == 7 for topic in _TOPICS)  # a stride of 3 then visits all seven
_DISTINCTIVE = _blocks(_DISTINCTIVE_TEXT)
_PHOTOS = {b.head[0]: (b.visuals[0], None if b.head[1] == "-" else b.head[1]) for b in _blocks(_PHOTO_TEXT)}
DISTINCTIVE_WORDS: tuple[str, ...] = tuple(b.head[0] for b in _DISTINCTIVE)


@dataclass(frozen=True)
class DemoScene:
    """A scene of a demo video, with the thumbnail already written to disk."""

    id: uuid.UUID
    video_id: uuid.UUID
    owner_id: uuid.UUID
    scene_index: int
    start_s: float
    end_s: float
    transcript: str
    visual_description: str
    tags: tuple[str, ...]
    summary: str | None
    thumbnail_uri: str
    thumbnail_sha256: str
    shows_person: str | None  # key of the person photographed in the thumbnail, if any
    topic: str


@dataclass(frozen=True)
class DemoVideo:
    """A demo video (READY or PROCESSING) and its scenes."""

    id: uuid.UUID
    owner_id: uuid.UUID
    title: str
    status: str
    created_at: datetime
    scenes: tuple[DemoScene, ...]


@dataclass(frozen=True)
class DemoPhoto:
    """A reference photo of a person, written to disk."""

    id: uuid.UUID
    person_id: uuid.UUID
    owner_id: uuid.UUID
    uri: str
    sha256: str


@dataclass(frozen=True)
class DemoPerson:
    """A person an owner wants found in thumbnails ("astronaut" or "cameraman")."""

    id: uuid.UUID
    owner_id: uuid.UUID
    key: str
    name: str
    photos: tuple[DemoPhoto, ...]


@dataclass(frozen=True)
class DemoOwner:
    """An owner with videos and persons."""

    id: uuid.UUID
    name: str
    videos: tuple[DemoVideo, ...]
    persons: tuple[DemoPerson, ...]


@dataclass(frozen=True)
class Corpus:
    """The whole demo corpus; the properties flatten it in owner order."""

    owners: tuple[DemoOwner, ...]

    @property
    def videos(self) -> tuple[DemoVideo, ...]:
        return tuple(v for o in self.owners for v in o.videos)

    @property
    def scenes(self) -> tuple[DemoScene, ...]:
        return tuple(s for v in self.videos for s in v.scenes)

    @property
    def persons(self) -> tuple[DemoPerson, ...]:
        return tuple(p for o in self.owners for p in o.persons)

    @property
    def photos(self) -> tuple[DemoPhoto, ...]:
        return tuple(ph for p in self.persons for ph in p.photos)

    @property
    def distinctive(self) -> dict[str, DemoScene]:
        """The one scene whose transcript holds each rare word (only words whose owner exists)."""
        return {w: s for s in self.scenes for w in DISTINCTIVE_WORDS if w in s.transcript.lower()}


def demo_id(name: str) -> uuid.UUID:
    """The corpus id for a readable name such as ``video/0/3``."""
    return uuid.uuid5(DEMO_NAMESPACE, name)


@cache
def _photo(name: str) -> Image.Image:
    from skimage import data  # imported lazily: only builds need it

    array = np.asarray(getattr(data, name)())
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255  # horse: a black figure on white
    return Image.fromarray(array).convert("RGB")


def _png(image: Image.Image, max_side: int = 320) -> bytes:
    image = image.copy()
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@cache
def _photo_png(name: str, box: tuple[int, int, int, int] | None = None, side: int = 320) -> bytes:
    """A bundled photograph, or a crop of it scaled to ``side`` px on its long side, as PNG."""
    if box is None:
        return _png(_photo(name))
    crop = _photo(name).crop(box)
    scale = side / max(crop.size)
    return _png(crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.Resampling.LANCZOS))


def _rendered_png(title: str, colors: str, seed: str) -> bytes:
    """A gradient, a few abstract shapes and the topic's title: no human figure."""
    rng = random.Random(seed)
    w, h = THUMB_SIZE
    t = (np.linspace(0.0, 1.0, w)[None, :] * 0.7 + np.linspace(0.0, 1.0, h)[:, None] * 0.3)[..., None]
    start, end = (np.array(ImageColor.getrgb(c), float) for c in colors.split())
    image = Image.fromarray((start * (1 - t) + end * t).round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 6)):
        x, y, r = rng.randrange(w), rng.randrange(h - 30), rng.randint(12, 60)
        fill = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        kind = rng.choice(("ellipse", "rectangle", "triangle"))
        if kind == "triangle":
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
        else:
            getattr(draw, kind)((x - r, y - r // 2, x + r, y + r // 2), fill=fill, outline=(0, 0, 0))
    draw.rectangle((0, h - 28, w, h), fill=(20, 20, 20))
    size = 16
    while size > 9 and ImageFont.load_default(size=size).getlength(title) > w - 16:
        size -= 1
    draw.text((8, h - 24), title, fill=(255, 255, 255), font=ImageFont.load_default(size=size))
    return _png(image)


def _write(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` unless it already holds exactly that; return its sha256."""
    if not (path.is_file() and path.read_bytes() == data):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def build_corpus(
    media_dir: Path,
    *,
    owners: int = 3,
    videos_per_owner: int = 7,
    scenes_per_video: int = 10,
    processing_videos: int = 1,
    real_photo_every: int = 5,
) -> Corpus:
    """Build the corpus and write its thumbnails and reference photos under ``media_dir`` (idempotent).

    ``processing_videos`` PROCESSING videos are added to the corpus (round-robin over owners) on top of
    the ``owners * videos_per_owner`` READY ones; every ``real_photo_every``-th scene shows a person.
    """
    media_dir = Path(media_dir).resolve()
    vpo, n_topics = videos_per_owner, len(_TOPICS)
    # (owner index, video index within its owner, global video counter, status)
    plan = [(i, j, i * vpo + j, "READY") for i in range(owners) for j in range(vpo)]
    plan += [
        (p % owners, vpo + p // owners, owners * vpo + p, "PROCESSING")
        for p in range(processing_videos if owners else 0)
    ]
    distinctive: dict[tuple[int, int, int], _Block] = {}
    for block in _DISTINCTIVE:
        i, topic_key = int(block.head[1]), block.head[2]
        if i < owners and vpo and scenes_per_video:
            topics = [_TOPICS[(i * vpo + j) % n_topics].head[0] for j in range(vpo)]
            j = topics.index(topic_key) if topic_key in topics else 0
            distinctive[(i, j, min(3, scenes_per_video - 1))] = block

    videos: dict[int, list[DemoVideo]] = {i: [] for i in range(owners)}
    counter = 0  # global scene counter
    for i, j, g, status in plan:
        topic = _TOPICS[g % n_topics]
        key, title, colors, topic_photo = topic.head
        owner_id, video_id = demo_id(f"owner/{i}"), demo_id(f"video/{i}/{j}")
        scenes, clock = [], 0  # clock in tenths of a second
        for k in range(scenes_per_video):
            scene_id = demo_id(f"scene/{i}/{j}/{k}")
            first, count = (k + g) % 7, 2 + (k + g) // 7 % 2  # (first, count) differ within a video
            transcript = " ".join(topic.sentences[(first + 3 * n) % 7] for n in range(count))
            (visual, tags), person = topic.visuals[(k + g) % len(topic.visuals)], None
            if real_photo_every > 0 and (counter + 1) % real_photo_every == 0:
                photo = _PERSON_SCENE_PHOTOS[counter // real_photo_every % 2]
                (visual, tags), person = _PHOTOS[photo]
                png = _photo_png(photo)
            elif topic_photo != "-" and k % 3 == 1:
                (visual, tags), _ = _PHOTOS[topic_photo]
                png = _photo_png(topic_photo)
            else:
                png = _rendered_png(title, colors, f"thumb/{scene_id}")
            if rare := distinctive.get((i, j, k)):
                transcript, (visual, tags) = f"{topic.sentences[first]} {rare.sentences[0]}", rare.visuals[0]
            path, duration = media_dir / "thumbnails" / f"{scene_id}.png", 60 + (k * 7 + g * 3) % 9 * 15
            summary = topic.summaries[(k // 4 + g) % 2] if k % 4 == 3 else None
            scenes.append(
                DemoScene(
                    id=scene_id,
                    video_id=video_id,
                    owner_id=owner_id,
                    scene_index=k,
                    start_s=clock / 10,
                    end_s=(clock + duration) / 10,
                    transcript=transcript,
                    visual_description=visual,
                    tags=tags,
                    summary=summary,
                    thumbnail_uri=str(path),
                    thumbnail_sha256=_write(path, png),
                    shows_person=person,
                    topic=key,
                )
            )
            clock += duration
            counter += 1
        created = BASE_TIME + timedelta(hours=6 * g)
        title = title if status == "READY" else f"{title} (raw upload)"
        videos[i].append(DemoVideo(video_id, owner_id, title, status, created, tuple(scenes)))

    result = []
    for i in range(owners):
        owner_id, persons = demo_id(f"owner/{i}"), []
        for key, (name, loader, crops) in _PERSONS.items():
            person_id, photos = demo_id(f"person/{i}/{key}"), []
            for n, (box, side) in enumerate(crops):
                photo_id = demo_id(f"photo/{i}/{key}/{n}")
                path = media_dir / "photos" / f"{photo_id}.png"
                sha = _write(path, _photo_png(loader, box, side))
                photos.append(DemoPhoto(photo_id, person_id, owner_id, str(path), sha))
            persons.append(DemoPerson(person_id, owner_id, key, name, tuple(photos)))
        name = _OWNER_NAMES[i] if i < len(_OWNER_NAMES) else f"Demo Owner {i}"
        result.append(DemoOwner(owner_id, name, tuple(videos[i]), tuple(persons)))
    return Corpus(tuple(result))


def _upsert(conn: Connection, table: Table, rows: list[dict[str, Any]], *, keep: Iterable[str] = ()) -> None:
    """Insert ``rows``; update every non-key column of rows that differ, ``keep`` columns not compared.

    ``updated_at`` becomes now() only when a row really changes, so a second load writes nothing.
    """
    skip = {"id", "updated_at", *keep}
    for start in range(0, len(rows), 500):
        stmt = insert(table).values(rows[start : start + 500])
        columns = [c for c in rows[0] if c != "id"]
        compared = [c for c in columns if c not in skip]
        set_: dict[str, Any] = {c: stmt.excluded[c] for c in columns}
        if "updated_at" in set_:
            set_["updated_at"] = func.now()
        old, new = tuple_(*(table.c[c] for c in compared)), tuple_(*(stmt.excluded[c] for c in compared))
        conn.execute(
            stmt.on_conflict_do_update(index_elements=[table.c.id], set_=set_, where=old.is_distinct_from(new))
        )


def _row(obj: Any, *fields: str, **extra: Any) -> dict[str, Any]:
    return {"id": obj.id, **{f: getattr(obj, f) for f in fields}, **extra}


def load_corpus(conn: Connection, corpus: Corpus) -> None:
    """Upsert the corpus into owners, videos, scenes, persons and reference photos (idempotent).

    Generated hash columns are left to the database. Photos are loaded PENDING; one whose uri and sha256
    are unchanged keeps the status it has reached.
    """
    at = BASE_TIME - timedelta(days=30)
    owners = [_row(o, "name", created_at=at + timedelta(days=i)) for i, o in enumerate(corpus.owners)]
    video_fields = ("owner_id", "title", "status", "created_at")
    videos = [_row(v, *video_fields, updated_at=v.created_at) for v in corpus.videos]
    created = {v.id: v.created_at for v in corpus.videos}
    scene_fields = ("video_id", "owner_id", "scene_index", "start_s", "end_s", "transcript")
    scene_fields += ("visual_description", "summary", "thumbnail_uri", "thumbnail_sha256")
    scenes = [_row(s, *scene_fields, tags=list(s.tags), updated_at=created[s.video_id]) for s in corpus.scenes]
    persons = [_row(p, "owner_id", "name", created_at=at, updated_at=at) for p in corpus.persons]
    photo_fields = ("person_id", "owner_id", "uri", "sha256")
    status = {"status": "PENDING", "failure_reason": None, "created_at": at, "updated_at": at}
    photos = [_row(ph, *photo_fields, **status) for ph in corpus.photos]
    _upsert(conn, tables.owners, owners)
    _upsert(conn, tables.videos, videos)
    _upsert(conn, tables.scenes, scenes)
    _upsert(conn, tables.persons, persons)
    _upsert(conn, tables.person_reference_photos, photos, keep=("status", "failure_reason"))
