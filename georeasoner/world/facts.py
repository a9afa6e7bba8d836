"""Country and city facts the embedded world draws, each a real-world GeoGuessr clue.

Every country has a style (driving side, road-line colours, plates, bollards, signs, script,
vegetation, hemisphere); every city a facade palette and a landmark silhouette. The camera of
every embedded street view faces east, so the sun stands to the right (south) in the northern
hemisphere and to the left (north) in the southern one.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class City:
    name: str  # GeoNames name, resolved to geonameid/lat/lon by georeasoner.geo
    facade: str  # key of FACADES
    landmark: str  # key of LANDMARKS


@dataclass(frozen=True)
class CountryStyle:
    iso2: str
    name: str
    hemisphere: str  # "N" | "S"
    drive: str  # "left" | "right"
    centre: str  # key of LINE_STYLES
    edge: str  # key of LINE_STYLES
    plate: str  # key of PLATES
    bollard: str | None  # key of BOLLARDS
    sign: str  # key of SIGNS
    script: str  # key of SCRIPTS
    vegetation: str  # key of VEGETATION
    kerb: str | None = None  # key of KERBS
    wires: bool = False  # dense overhead wires on concrete poles
    cities: tuple[City, ...] = field(default_factory=tuple)


# Road lines: (colour RGB, pattern, words used in clue texts)
LINE_STYLES = {
    "yellow_double": ((236, 196, 40), "double", "double solid yellow"),
    "yellow_dashed": ((236, 196, 40), "dashed", "dashed yellow"),
    "yellow_solid": ((236, 196, 40), "solid", "solid yellow"),
    "white_dashed": ((238, 238, 232), "dashed", "dashed white"),
    "white_short_dashed": ((238, 238, 232), "short_dashed", "short-dashed white"),
    "white_solid": ((238, 238, 232), "solid", "solid white"),
    "white_double": ((238, 238, 232), "double", "double solid white"),
}

# Rear licence plates: (background, band colour or None, band position, words)
PLATES = {
    "white_plain": ((240, 240, 236), None, None, "plain white"),
    "yellow_rear": ((244, 200, 20), None, None, "yellow rear"),
    "white_eu_band": ((240, 240, 236), (30, 60, 170), "left", "white with a blue EU band on the left"),
    "white_eu_two_bands": ((240, 240, 236), (30, 60, 170), "both", "white with blue bands on both ends"),
    "white_top_band": ((240, 240, 236), (30, 60, 170), "top", "white with a blue Mercosur strip on top"),
    "white_green_text": ((240, 240, 236), (40, 140, 70), "text", "white with green characters"),
    "white_flag_band": ((240, 240, 236), (200, 30, 40), "right", "white with a small flag on the right"),
}

# Roadside bollards: (body, band or None, reflector, words)
BOLLARDS = {
    "white_black_band_red": ((240, 240, 240), (20, 20, 20), (210, 30, 30), "white with a black band and a red reflector"),
    "white_black_band_orange": ((240, 240, 240), (20, 20, 20), (240, 140, 20), "white with a black band and an orange reflector"),
    "black_yellow": ((25, 25, 25), None, (245, 205, 30), "black with a yellow reflector"),
    "white_red": ((240, 240, 240), None, (210, 30, 30), "plain white with a red reflector"),
    "white_black_stripes": ((240, 240, 240), (20, 20, 20), (240, 240, 240), "white with black stripes"),
}

# Warning signs: words
SIGNS = {
    "red_triangle": "red-bordered triangular warning signs",
    "yellow_diamond": "yellow diamond-shaped warning signs",
    "yellow_triangle": "triangular warning signs with a yellow background and a red border",
    "inverted_red_triangle": "inverted red triangle stop signs",
}

SCRIPTS = {
    "latin": "the Latin alphabet",
    "cyrillic": "Cyrillic letters",
    "devanagari": "Devanagari script with its headline bar",
    "thai": "Thai script with its little loops",
    "japanese": "Japanese kana and kanji",
}

# Vegetation: (tree colour, ground colour, tree shape, ADE20K ground class, words)
VEGETATION = {
    "temperate": ((58, 112, 48), (92, 140, 66), "round", "grass", "green deciduous trees and lush grass"),
    "boreal": ((28, 70, 44), (84, 110, 70), "conifer", "grass", "dark conifers and birches"),
    "tropical": ((30, 150, 60), (70, 160, 60), "palm", "grass", "palm trees and bright tropical green"),
    "arid": ((110, 120, 70), (190, 120, 70), "scrub", "earth", "sparse olive eucalyptus and red soil"),
    "savanna": ((95, 110, 45), (196, 170, 100), "acacia", "earth", "flat-topped acacias over dry yellow grass"),
    "dusty": ((80, 110, 50), (176, 150, 110), "round", "earth", "dusty trees over bare brown ground"),
}

KERBS = {
    "black_yellow": (((25, 25, 25), (245, 205, 30)), "kerbs painted black and yellow"),
    "red_white": (((200, 30, 30), (240, 240, 240)), "kerbs painted red and white"),
}

FACADES = {
    "ochre": (204, 140, 60),
    "red_brick": (150, 60, 45),
    "pastel_blue": (140, 180, 210),
    "pastel_pink": (226, 160, 170),
    "white_stucco": (236, 232, 220),
    "grey_concrete": (128, 128, 132),
    "mint_green": (150, 205, 170),
    "dark_timber": (92, 62, 40),
    "sand_yellow": (222, 200, 130),
    "glass_teal": (60, 130, 140),
}

LANDMARKS = {
    "spire": "a slender spire",
    "dome": "a great dome",
    "needle": "a needle tower with a ball on top",
    "twin_towers": "twin skyscrapers",
    "pagoda": "a tiered pagoda",
    "arch": "a monumental arch",
    "pyramid": "a glass pyramid",
    "clock_tower": "a clock tower",
    "onion_dome": "onion domes",
    "bridge_towers": "suspension-bridge towers",
    "stepped_tower": "a stepped tower",
    "mountain_peak": "a flat-topped mountain",
}

COUNTRIES: tuple[CountryStyle, ...] = (
    CountryStyle("US", "the United States", "N", "right", "yellow_double", "white_solid", "white_plain", None,
                 "yellow_diamond", "latin", "temperate",
                 cities=(City("New York City", "red_brick", "twin_towers"), City("Chicago", "grey_concrete", "needle"),
                         City("Los Angeles", "sand_yellow", "bridge_towers"))),
    CountryStyle("BR", "Brazil", "S", "right", "yellow_dashed", "white_solid", "white_top_band", None,
                 "yellow_diamond", "latin", "tropical",
                 cities=(City("São Paulo", "grey_concrete", "twin_towers"), City("Rio de Janeiro", "pastel_pink", "mountain_peak"),
                         City("Brasília", "white_stucco", "dome"))),
    CountryStyle("GB", "the United Kingdom", "N", "left", "white_dashed", "yellow_double", "yellow_rear", "white_red",
                 "red_triangle", "latin", "temperate",
                 cities=(City("London", "red_brick", "clock_tower"), City("Manchester", "dark_timber", "needle"),
                         City("Edinburgh", "grey_concrete", "spire"))),
    CountryStyle("FR", "France", "N", "right", "white_short_dashed", "white_short_dashed", "white_eu_two_bands",
                 "white_black_band_red", "red_triangle", "latin", "temperate",
                 cities=(City("Paris", "sand_yellow", "arch"), City("Lyon", "ochre", "dome"),
                         City("Marseille", "white_stucco", "spire"))),
    CountryStyle("DE", "Germany", "N", "right", "white_dashed", "white_solid", "white_eu_band",
                 "white_black_band_orange", "red_triangle", "latin", "temperate",
                 cities=(City("Berlin", "grey_concrete", "needle"), City("Munich", "white_stucco", "onion_dome"),
                         City("Hamburg", "red_brick", "spire"))),
    CountryStyle("NO", "Norway", "N", "right", "yellow_dashed", "white_solid", "white_flag_band", "black_yellow",
                 "yellow_triangle", "latin", "boreal",
                 cities=(City("Oslo", "ochre", "stepped_tower"), City("Bergen", "dark_timber", "mountain_peak"),
                         City("Trondheim", "red_brick", "spire"))),
    CountryStyle("RU", "Russia", "N", "right", "white_double", "white_solid", "white_flag_band", "white_black_stripes",
                 "red_triangle", "cyrillic", "boreal",
                 cities=(City("Moscow", "red_brick", "onion_dome"), City("Saint Petersburg", "mint_green", "spire"),
                         City("Novosibirsk", "grey_concrete", "dome"))),
    CountryStyle("ZA", "South Africa", "S", "left", "white_dashed", "yellow_solid", "white_plain", "white_red",
                 "red_triangle", "latin", "savanna",
                 cities=(City("Johannesburg", "grey_concrete", "needle"), City("Cape Town", "pastel_blue", "mountain_peak"),
                         City("Durban", "white_stucco", "arch"))),
    CountryStyle("IN", "India", "N", "left", "white_dashed", "white_solid", "white_plain", None,
                 "red_triangle", "devanagari", "dusty", kerb="black_yellow",
                 cities=(City("Mumbai", "pastel_pink", "arch"), City("Delhi", "red_brick", "dome"),
                         City("Bengaluru", "glass_teal", "stepped_tower"))),
    CountryStyle("TH", "Thailand", "N", "left", "yellow_solid", "white_solid", "white_plain", None,
                 "yellow_diamond", "thai", "tropical", kerb="red_white",
                 cities=(City("Bangkok", "white_stucco", "pagoda"), City("Chiang Mai", "dark_timber", "stepped_tower"),
                         City("Phuket", "pastel_blue", "dome"))),
    CountryStyle("JP", "Japan", "N", "left", "white_dashed", "white_solid", "white_green_text", None,
                 "inverted_red_triangle", "japanese", "temperate", wires=True,
                 cities=(City("Tokyo", "grey_concrete", "needle"), City("Osaka", "glass_teal", "clock_tower"),
                         City("Sapporo", "white_stucco", "pagoda"))),
    CountryStyle("AU", "Australia", "S", "left", "white_dashed", "white_solid", "white_plain", "white_red",
                 "yellow_diamond", "latin", "arid",
                 cities=(City("Sydney", "sand_yellow", "bridge_towers"), City("Melbourne", "grey_concrete", "spire"),
                         City("Perth", "white_stucco", "needle"))),
)

COUNTRY_BY_ISO2 = {c.iso2: c for c in COUNTRIES}
