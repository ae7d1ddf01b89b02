"""X11 keysyms (what RFB KeyEvents carry) to Linux ``KEY_*`` codes (what InputSinks take).

RFB sends the *symbol* a key produced ('A', '!', Return), not the key: keysyms are X11's
numbering (X11 keysymdef.h; Latin-1 characters are their own code). A guest keyboard wants
physical keys, so this table assumes the guest uses a US layout, like QEMU's default
keymap: 'A' is KEY_A with Shift, '!' is KEY_1 with Shift. :func:`keysym_to_key` says which
key a keysym is and whether it sits on the shifted level, so the server can press Shift
around it when the client is not holding Shift itself (``vncdo type Hello!`` sends 'H' and
'!' with no Shift events).

Codes are the values of linux/input-event-codes.h.
"""

from __future__ import annotations

# --- Linux input event codes (linux/input-event-codes.h) ---
KEY_ESC = 1
KEY_1 = 2
KEY_2 = 3
KEY_3 = 4
KEY_4 = 5
KEY_5 = 6
KEY_6 = 7
KEY_7 = 8
KEY_8 = 9
KEY_9 = 10
KEY_0 = 11
KEY_MINUS = 12
KEY_EQUAL = 13
KEY_BACKSPACE = 14
KEY_TAB = 15
KEY_Q = 16
KEY_W = 17
KEY_E = 18
KEY_R = 19
KEY_T = 20
KEY_Y = 21
KEY_U = 22
KEY_I = 23
KEY_O = 24
KEY_P = 25
KEY_LEFTBRACE = 26
KEY_RIGHTBRACE = 27
KEY_ENTER = 28
KEY_LEFTCTRL = 29
KEY_A = 30
KEY_S = 31
KEY_D = 32
KEY_F = 33
KEY_G = 34
KEY_H = 35
KEY_J = 36
KEY_K = 37
KEY_L = 38
KEY_SEMICOLON = 39
KEY_APOSTROPHE = 40
KEY_GRAVE = 41
KEY_LEFTSHIFT = 42
KEY_BACKSLASH = 43
KEY_Z = 44
KEY_X = 45
KEY_C = 46
KEY_V = 47
KEY_B = 48
KEY_N = 49
KEY_M = 50
KEY_COMMA = 51
KEY_DOT = 52
KEY_SLASH = 53
KEY_RIGHTSHIFT = 54
KEY_KPASTERISK = 55
KEY_LEFTALT = 56
KEY_SPACE = 57
KEY_CAPSLOCK = 58
KEY_F1 = 59
KEY_F2 = 60
KEY_F3 = 61
KEY_F4 = 62
KEY_F5 = 63
KEY_F6 = 64
KEY_F7 = 65
KEY_F8 = 66
KEY_F9 = 67
KEY_F10 = 68
KEY_NUMLOCK = 69
KEY_SCROLLLOCK = 70
KEY_KP7 = 71
KEY_KP8 = 72
KEY_KP9 = 73
KEY_KPMINUS = 74
KEY_KP4 = 75
KEY_KP5 = 76
KEY_KP6 = 77
KEY_KPPLUS = 78
KEY_KP1 = 79
KEY_KP2 = 80
KEY_KP3 = 81
KEY_KP0 = 82
KEY_KPDOT = 83
KEY_102ND = 86
KEY_F11 = 87
KEY_F12 = 88
KEY_KPENTER = 96
KEY_RIGHTCTRL = 97
KEY_KPSLASH = 98
KEY_SYSRQ = 99
KEY_RIGHTALT = 100
KEY_LINEFEED = 101
KEY_HOME = 102
KEY_UP = 103
KEY_PAGEUP = 104
KEY_LEFT = 105
KEY_RIGHT = 106
KEY_END = 107
KEY_DOWN = 108
KEY_PAGEDOWN = 109
KEY_INSERT = 110
KEY_DELETE = 111
KEY_KPEQUAL = 117
KEY_PAUSE = 119
KEY_KPCOMMA = 121
KEY_LEFTMETA = 125
KEY_RIGHTMETA = 126
KEY_COMPOSE = 127
KEY_F13 = 183
KEY_F24 = 194

# --- X11 keysyms (X11 keysymdef.h), the non-character ones ---
XK_BACKSPACE = 0xFF08
XK_TAB = 0xFF09
XK_LINEFEED = 0xFF0A
XK_RETURN = 0xFF0D
XK_PAUSE = 0xFF13
XK_SCROLL_LOCK = 0xFF14
XK_SYS_REQ = 0xFF15
XK_ESCAPE = 0xFF1B
XK_HOME = 0xFF50
XK_LEFT = 0xFF51
XK_UP = 0xFF52
XK_RIGHT = 0xFF53
XK_DOWN = 0xFF54
XK_PAGE_UP = 0xFF55  # XK_Prior
XK_PAGE_DOWN = 0xFF56  # XK_Next
XK_END = 0xFF57
XK_PRINT = 0xFF61
XK_INSERT = 0xFF63
XK_MENU = 0xFF67
XK_BREAK = 0xFF6B
XK_NUM_LOCK = 0xFF7F
XK_KP_ENTER = 0xFF8D
XK_KP_HOME = 0xFF95
XK_KP_LEFT = 0xFF96
XK_KP_UP = 0xFF97
XK_KP_RIGHT = 0xFF98
XK_KP_DOWN = 0xFF99
XK_KP_PAGE_UP = 0xFF9A
XK_KP_PAGE_DOWN = 0xFF9B
XK_KP_END = 0xFF9C
XK_KP_BEGIN = 0xFF9D
XK_KP_INSERT = 0xFF9E
XK_KP_DELETE = 0xFF9F
XK_KP_MULTIPLY = 0xFFAA
XK_KP_ADD = 0xFFAB
XK_KP_SEPARATOR = 0xFFAC
XK_KP_SUBTRACT = 0xFFAD
XK_KP_DECIMAL = 0xFFAE
XK_KP_DIVIDE = 0xFFAF
XK_KP_0 = 0xFFB0  # XK_KP_0 .. XK_KP_9 are consecutive
XK_KP_EQUAL = 0xFFBD
XK_F1 = 0xFFBE  # XK_F1 .. XK_F24 are consecutive
XK_SHIFT_L = 0xFFE1
XK_SHIFT_R = 0xFFE2
XK_CONTROL_L = 0xFFE3
XK_CONTROL_R = 0xFFE4
XK_CAPS_LOCK = 0xFFE5
XK_META_L = 0xFFE7
XK_META_R = 0xFFE8
XK_ALT_L = 0xFFE9
XK_ALT_R = 0xFFEA
XK_SUPER_L = 0xFFEB
XK_SUPER_R = 0xFFEC
XK_DELETE = 0xFFFF
XK_ISO_LEVEL3_SHIFT = 0xFE03  # AltGr
XK_ISO_LEFT_TAB = 0xFE20  # Shift+Tab
# Unicode keysyms are 0x01000000 + the code point (some clients send them for ASCII too).
XK_UNICODE_BASE = 0x0100_0000

SHIFT_KEYSYMS = frozenset({XK_SHIFT_L, XK_SHIFT_R})

# US layout: the character on each key's plain level ...
_US_PLAIN = {
    **{chr(ord("a") + i): code for i, code in enumerate((
        KEY_A, KEY_B, KEY_C, KEY_D, KEY_E, KEY_F, KEY_G, KEY_H, KEY_I, KEY_J, KEY_K, KEY_L,
        KEY_M, KEY_N, KEY_O, KEY_P, KEY_Q, KEY_R, KEY_S, KEY_T, KEY_U, KEY_V, KEY_W, KEY_X,
        KEY_Y, KEY_Z,
    ))},
    "1": KEY_1, "2": KEY_2, "3": KEY_3, "4": KEY_4, "5": KEY_5,
    "6": KEY_6, "7": KEY_7, "8": KEY_8, "9": KEY_9, "0": KEY_0,
    " ": KEY_SPACE, "-": KEY_MINUS, "=": KEY_EQUAL, "[": KEY_LEFTBRACE, "]": KEY_RIGHTBRACE,
    ";": KEY_SEMICOLON, "'": KEY_APOSTROPHE, "`": KEY_GRAVE, "\\": KEY_BACKSLASH,
    ",": KEY_COMMA, ".": KEY_DOT, "/": KEY_SLASH,
}  # fmt: skip

# ... and on its Shift level.
_US_SHIFTED = {
    **{c.upper(): code for c, code in _US_PLAIN.items() if c.isalpha()},
    "!": KEY_1, "@": KEY_2, "#": KEY_3, "$": KEY_4, "%": KEY_5,
    "^": KEY_6, "&": KEY_7, "*": KEY_8, "(": KEY_9, ")": KEY_0,
    "_": KEY_MINUS, "+": KEY_EQUAL, "{": KEY_LEFTBRACE, "}": KEY_RIGHTBRACE,
    ":": KEY_SEMICOLON, '"': KEY_APOSTROPHE, "~": KEY_GRAVE, "|": KEY_BACKSLASH,
    "<": KEY_COMMA, ">": KEY_DOT, "?": KEY_SLASH,
}  # fmt: skip

_FUNCTION_KEYS = (
    KEY_F1, KEY_F2, KEY_F3, KEY_F4, KEY_F5, KEY_F6,
    KEY_F7, KEY_F8, KEY_F9, KEY_F10, KEY_F11, KEY_F12,
    *range(KEY_F13, KEY_F24 + 1),
)  # fmt: skip

_KEYPAD_DIGITS = (KEY_KP0, KEY_KP1, KEY_KP2, KEY_KP3, KEY_KP4,
                  KEY_KP5, KEY_KP6, KEY_KP7, KEY_KP8, KEY_KP9)  # fmt: skip

# Keys that are not characters.
_SPECIAL = {
    XK_BACKSPACE: KEY_BACKSPACE,
    XK_TAB: KEY_TAB,
    XK_LINEFEED: KEY_LINEFEED,
    XK_RETURN: KEY_ENTER,
    XK_PAUSE: KEY_PAUSE,
    XK_BREAK: KEY_PAUSE,
    XK_SCROLL_LOCK: KEY_SCROLLLOCK,
    XK_SYS_REQ: KEY_SYSRQ,
    XK_ESCAPE: KEY_ESC,
    XK_HOME: KEY_HOME,
    XK_LEFT: KEY_LEFT,
    XK_UP: KEY_UP,
    XK_RIGHT: KEY_RIGHT,
    XK_DOWN: KEY_DOWN,
    XK_PAGE_UP: KEY_PAGEUP,
    XK_PAGE_DOWN: KEY_PAGEDOWN,
    XK_END: KEY_END,
    XK_PRINT: KEY_SYSRQ,  # Linux names the Print Screen key KEY_SYSRQ
    XK_INSERT: KEY_INSERT,
    XK_MENU: KEY_COMPOSE,  # the PC "menu" key is KEY_COMPOSE in Linux
    XK_NUM_LOCK: KEY_NUMLOCK,
    XK_KP_ENTER: KEY_KPENTER,
    # Keypad keys with NumLock off arrive as navigation keysyms.
    XK_KP_HOME: KEY_KP7,
    XK_KP_LEFT: KEY_KP4,
    XK_KP_UP: KEY_KP8,
    XK_KP_RIGHT: KEY_KP6,
    XK_KP_DOWN: KEY_KP2,
    XK_KP_PAGE_UP: KEY_KP9,
    XK_KP_PAGE_DOWN: KEY_KP3,
    XK_KP_END: KEY_KP1,
    XK_KP_BEGIN: KEY_KP5,
    XK_KP_INSERT: KEY_KP0,
    XK_KP_DELETE: KEY_KPDOT,
    XK_KP_MULTIPLY: KEY_KPASTERISK,
    XK_KP_ADD: KEY_KPPLUS,
    XK_KP_SEPARATOR: KEY_KPCOMMA,
    XK_KP_SUBTRACT: KEY_KPMINUS,
    XK_KP_DECIMAL: KEY_KPDOT,
    XK_KP_DIVIDE: KEY_KPSLASH,
    XK_KP_EQUAL: KEY_KPEQUAL,
    **{XK_KP_0 + i: code for i, code in enumerate(_KEYPAD_DIGITS)},
    **{XK_F1 + i: code for i, code in enumerate(_FUNCTION_KEYS)},
    XK_SHIFT_L: KEY_LEFTSHIFT,
    XK_SHIFT_R: KEY_RIGHTSHIFT,
    XK_CONTROL_L: KEY_LEFTCTRL,
    XK_CONTROL_R: KEY_RIGHTCTRL,
    XK_CAPS_LOCK: KEY_CAPSLOCK,
    XK_META_L: KEY_LEFTMETA,
    XK_META_R: KEY_RIGHTMETA,
    XK_ALT_L: KEY_LEFTALT,
    XK_ALT_R: KEY_RIGHTALT,
    XK_SUPER_L: KEY_LEFTMETA,
    XK_SUPER_R: KEY_RIGHTMETA,
    XK_ISO_LEVEL3_SHIFT: KEY_RIGHTALT,
    XK_DELETE: KEY_DELETE,
}

# keysym -> (Linux code, whether the keysym is on the Shift level)
KEYSYM_TO_KEY: dict[int, tuple[int, bool]] = {
    **{ord(c): (code, False) for c, code in _US_PLAIN.items()},
    **{ord(c): (code, True) for c, code in _US_SHIFTED.items()},
    **{keysym: (code, False) for keysym, code in _SPECIAL.items()},
    XK_ISO_LEFT_TAB: (KEY_TAB, True),
}


def keysym_to_key(keysym: int) -> tuple[int, bool] | None:
    """The Linux key code for ``keysym`` and whether it needs Shift, or None for a keysym
    a US keyboard has no key for."""
    if XK_UNICODE_BASE <= keysym < XK_UNICODE_BASE + 0x80:
        keysym -= XK_UNICODE_BASE
    return KEYSYM_TO_KEY.get(keysym)
