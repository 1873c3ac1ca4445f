"""A character-level EBNF grammar (xgrammar's dialect) for Python 3.10+ as people write it.

Indentation is handled by unrolling: the statement rules are generated once per indentation level
``1..depth`` (level k is ``k`` copies of ``indent``), so INDENT/DEDENT become ordinary
context-free structure and the grammar is matched character by character by xgrammar, whatever
the tokenizer does at line starts (a token may hold a newline and the next line's indentation, or
half of it). See docs/python_grammar.md for why this was chosen over a separate indentation
potential. Statement rules also come in two flavours, inside a loop or not, so ``break`` and
``continue`` appear only where they compile.

Expressions are generated for four lexical contexts: a logical line (whitespace is spaces, tabs
and backslash continuations), inside brackets (newlines and comments allowed too), and inside the
replacement fields of f-strings delimited by ``"`` or ``'`` (no newline, no backslash, no string
with the delimiting quote, no dict/set display: what Python 3.10/3.11 accept there).

Keyword operators (``and``, ``if``, ``in``, ...) need whitespace on both sides, and statement
keywords need whitespace before an expression (``return(x)`` is refused): what keeps an identifier
from running into a keyword without a context-sensitive lexer. Rejected constructs are measured by
benchmarks/python_grammar_coverage.py.
"""

from __future__ import annotations

import keyword
import re
import string

__all__ = ["identifier_rules", "python_grammar"]

IDENT_START = string.ascii_letters + "_"
IDENT_CHARS = string.ascii_letters + string.digits + "_"


def _char_class(chars: str) -> str:
    if not chars:
        raise ValueError("empty class")
    return "[" + "".join(sorted(chars)) + "]"


def identifier_rules(name: str, reserved: list[str]) -> str:
    """EBNF rules for identifiers ([A-Za-z_][A-Za-z0-9_]*) that are none of ``reserved``.

    Built from the trie of the reserved words: a rule per trie node allows stopping there unless
    the prefix is a reserved word, continuing along the trie, or leaving it (then anything goes).
    """
    trie: dict[str, set[str]] = {"": set()}
    for w in reserved:
        for i in range(1, len(w) + 1):
            trie.setdefault(w[:i], set())
            trie[w[: i - 1]].add(w[i - 1])
    ids = {p: f"{name}_{i}" for i, p in enumerate(sorted(trie))}
    rest = f"{name}_rest"
    lines = [f"{rest} ::= {_char_class(IDENT_CHARS)}*"]
    for prefix in sorted(trie):
        alts = []
        if prefix and prefix not in reserved:
            alts.append('""')
        for c in sorted(trie[prefix]):
            alts.append(f'"{c}" {ids[prefix + c]}')
        others = IDENT_START if not prefix else IDENT_CHARS
        others = "".join(c for c in others if c not in trie[prefix])
        if others:
            alts.append(f"{_char_class(others)} {rest}")
        lines.append(f"{ids[prefix]} ::= " + " | ".join(alts))
    lines.append(f"{name} ::= {ids['']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- lexical
_LEXICAL = r"""
wl ::= ([ \t\f] | "\\" "\n")*
wl1 ::= ([ \t\f] | "\\" "\n") wl
wn ::= ([ \t\f\r\n] | "\\" "\n" | "#" [^\n]* "\n")*
wn1 ::= ([ \t\f\r\n] | "\\" "\n" | "#" [^\n]* "\n") wn
wd ::= [ \t]*
wd1 ::= [ \t]+
ws ::= [ \t]*
ws1 ::= [ \t]+
eol ::= wl ("#" [^\n]*)? "\n"
blank ::= [ \t\f]* (comment | "\n")
comment ::= "#" [^\n]* "\n"
dname ::= name ("." name)*
number ::= (int | float) [jJ]?
int ::= [1-9] ("_"? [0-9])* | "0" ("_"? "0")* | "0" [xX] ("_"? [0-9a-fA-F])+ | "0" [oO] ("_"? [0-7])+ | "0" [bB] ("_"? [01])+
digits ::= [0-9] ("_"? [0-9])*
float ::= digits "." digits? exponent? | "." digits exponent? | digits exponent
exponent ::= [eE] [+-]? digits
hex ::= [0-9a-fA-F]
esc ::= "\\" ([^xuUN] | "x" hex hex | "u" hex hex hex hex | "U" hex hex hex hex hex hex hex hex | "N{" [A-Za-z0-9 \-]+ "}")
resc ::= "\\" [^]
besc ::= "\\" [\t -~\n]
sq_ch ::= [^'\\\n] | esc
dq_ch ::= [^"\\\n] | esc
rsq_ch ::= [^'\\\n] | resc
rdq_ch ::= [^"\\\n] | resc
bsq_ch ::= [\t -&(-\[\]-~] | besc
bdq_ch ::= [\t !#-\[\]-~] | besc
tsq_nq ::= [^'\\] | esc
tdq_nq ::= [^"\\] | esc
rtsq_nq ::= [^'\\] | resc
rtdq_nq ::= [^"\\] | resc
btsq_nq ::= [\t\n -&(-\[\]-~] | besc
btdq_nq ::= [\t\n !#-\[\]-~] | besc
uprefix ::= [uU]
rprefix ::= [rR]
bprefix ::= [bB]
brprefix ::= [bB] [rR] | [rR] [bB]
fprefix ::= [fF] | [fF] [rR] | [rR] [fF]
sstr ::= uprefix? plainstr | rprefix rawstr | fprefix fstr
plainstr ::= "'" [^'\\\n]* (esc [^'\\\n]*)* "'" | "\"" [^"\\\n]* (esc [^"\\\n]*)* "\"" | "'''" (tsq_nq | "'" tsq_nq | "''" tsq_nq)* "'''" | "\"\"\"" (tdq_nq | "\"" tdq_nq | "\"\"" tdq_nq)* "\"\"\""
rawstr ::= "'" [^'\\\n]* (resc [^'\\\n]*)* "'" | "\"" [^"\\\n]* (resc [^"\\\n]*)* "\"" | "'''" (rtsq_nq | "'" rtsq_nq | "''" rtsq_nq)* "'''" | "\"\"\"" (rtdq_nq | "\"" rtdq_nq | "\"\"" rtdq_nq)* "\"\"\""
bstr ::= (bprefix | brprefix) ("'" bsq_ch* "'" | "\"" bdq_ch* "\"" | "'''" (btsq_nq | "'" btsq_nq | "''" btsq_nq)* "'''" | "\"\"\"" (btdq_nq | "\"" btdq_nq | "\"\"" btdq_nq)* "\"\"\"")
fsq_nq ::= [^'\\\n{}] | esc | "{{" | "}}" | field_s
fdq_nq ::= [^"\\\n{}] | esc | "{{" | "}}" | field_d
ftsq_nq ::= [^'\\{}] | esc | "{{" | "}}" | field_s
ftdq_nq ::= [^"\\{}] | esc | "{{" | "}}" | field_d
fstr ::= "'" fsq_nq* "'" | "\"" fdq_nq* "\"" | "'''" (ftsq_nq | "'" ftsq_nq | "''" ftsq_nq)* "'''" | "\"\"\"" (ftdq_nq | "\"" ftdq_nq | "\"\"" ftdq_nq)* "\"\"\""
field_d ::= "{" wd testlist_d wd ("=" wd)? ("!" [rsa])? (":" fspec_d)? "}"
field_s ::= "{" ws testlist_s ws ("=" ws)? ("!" [rsa])? (":" fspec_s)? "}"
fspec_d ::= ([^"\\\n{}] | "{" wd test_d wd ("!" [rsa])? "}")*
fspec_s ::= ([^'\\\n{}] | "{" ws test_s ws ("!" [rsa])? "}")*
strs_l ::= sstr (wl sstr)* | bstr (wl bstr)*
strs_n ::= sstr (wn sstr)* | bstr (wn bstr)*
strs_d ::= ([uU] | [rR])? "'" [^'"\\\n{}]* "'" (wd ([uU] | [rR])? "'" [^'"\\\n{}]* "'")*
strs_s ::= ([uU] | [rR])? "\"" [^'"\\\n{}]* "\"" (ws ([uU] | [rR])? "\"" [^'"\\\n{}]* "\"")*
augop ::= "+=" | "-=" | "*=" | "/=" | "//=" | "%=" | "@=" | "&=" | "|=" | "^=" | ">>=" | "<<=" | "**="
arithop ::= "+" | "-" | "*" | "/" | "//" | "%" | "@" | "**" | "|" | "^" | "&" | "<<" | ">>"
binop ::= arithop | "<" | ">" | "==" | ">=" | "<=" | "!="
litpat ::= "-"? number (("+" | "-") number)? | sstr | "None" | "True" | "False"
"""

# ------------------------------------------------------------------------------------ expressions
# $c: this context, $B: the context inside brackets, $W / $W1: optional / required whitespace of
# this context, $WB: whitespace inside brackets. Every rule starts and ends on a non-blank
# character; whitespace sits only between the pieces a rule joins (keeps the grammar's ambiguity low).
_EXPR = r"""
testlist_$c ::= test_$c ($W "," $W test_$c)* ($W ",")?
starlist_$c ::= sx_$c ($W "," $W sx_$c)* ($W ",")?
sx_$c ::= test_$c | "*" $W bor_$c
se_$c ::= ntest_$c | "*" $W bor_$c
ntest_$c ::= name $W ":=" $W test_$c | test_$c
test_$c ::= or_$c ($W1 "if" $W1 or_$c $W1 "else" $W1 test_$c)? $LAMBDA
lambda_$c ::= "lambda" ($W1 lparams_$c)? $W ":" $W test_$c
or_$c ::= not_$c ($W1 ("and" | "or") $W1 not_$c)*
not_$c ::= "not" $W1 not_$c | chain_$c
chain_$c ::= operand_$c ($W binop $W operand_$c | $W1 ("in" | "not" $W1 "in" | "is" | "is" $W1 "not") $W1 operand_$c)*
bor_$c ::= operand_$c ($W arithop $W operand_$c)*
operand_$c ::= [+\-~] $W operand_$c | ("await" $W1)? (number | atom_$c ($W trailer_$c)*)
atom_$c ::= name | "None" | "True" | "False" | "__debug__" | "..." | strs_$c | "(" $WB (paren_$B $WB)? ")" | "[" $WB (list_$B $WB)? "]" $BRACE
trailer_$c ::= "(" $WB (args_$B $WB)? ")" | "[" $WB subs_$B $WB "]" | "." $W name
paren_$c ::= yield_$c | ntest_$c $W1 compfor_$c | ntest_$c | se_$c ($W "," $W se_$c)+ ($W ",")? | se_$c $W ","
list_$c ::= ntest_$c $W1 compfor_$c | se_$c ($W "," $W se_$c)* ($W ",")?
brace_$c ::= kv_$c ($W "," $W kv_$c)* ($W ",")? | test_$c $W ":" $W test_$c $W1 compfor_$c | se_$c ($W "," $W se_$c)* ($W ",")? | ntest_$c $W1 compfor_$c
kv_$c ::= test_$c $W ":" $W test_$c | "**" $W bor_$c
compfor_$c ::= ("async" $W1)? "for" $W1 tlist_$c $W1 "in" $W1 or_$c ($W1 (("async" $W1)? "for" $W1 tlist_$c $W1 "in" $W1 or_$c | "if" $W1 or_$c))*
subs_$c ::= sub_$c ($W "," $W sub_$c)* ($W ",")?
sub_$c ::= ntest_$c | "*" $W bor_$c | (test_$c $W)? ":" ($W test_$c)? ($W ":" ($W test_$c)?)?
args_$c ::= ntest_$c $W1 compfor_$c | pa_$c ($W "," $W pa_$c)* ($W "," $W ka_$c)* ($W "," $W kb_$c)* ($W ",")? | ka_$c ($W "," $W ka_$c)* ($W "," $W kb_$c)* ($W ",")? | kb_$c ($W "," $W kb_$c)* ($W ",")?
pa_$c ::= ntest_$c | "*" $W test_$c
kw_$c ::= name $W "=" $W test_$c
ka_$c ::= kw_$c | "*" $W test_$c
kb_$c ::= kw_$c | "**" $W test_$c
yield_$c ::= "yield" ($W1 "from" $W1 test_$c | $W1 starlist_$c)?
tlist_$c ::= target_$c ($W "," $W starget_$c)+ ($W ",")? | starget_$c $W "," | target_$c
starget_$c ::= target_$c | "*" $W target_$c
target_$c ::= name | tprim_$c | "(" $WB (tlist_$B $WB)? ")" | "[" $WB (tlist_$B $WB)? "]"
tprim_$c ::= atom_$c ($W trailer_$c)* $W ("." $W name | "[" $WB subs_$B $WB "]")
"""

# parameters: $P is the parameter rule's name; annotated in def, bare in lambda
_PARAMS = r"""
$Pn_$c ::= name $ANN
$Pd_$c ::= $Pn_$c $W "=" $W test_$c
$P_$c ::= $Ppos_$c ($W "," $W $Pstar_$c)? ($W "," $W $Pdstar_$c)? ($W ",")? | $Pstar_$c ($W "," $W $Pdstar_$c)? ($W ",")? | $Pdstar_$c ($W ",")?
$Ppos_$c ::= $Pn_$c ($W "," $W $Pn_$c)* ($W "," $W "/")? ($W "," $W $Pn_$c)* ($W "," $W $Pd_$c)* | $Pn_$c ($W "," $W $Pn_$c)* ($W "," $W $Pd_$c)+ $W "," $W "/" ($W "," $W $Pd_$c)* | $Pd_$c ($W "," $W $Pd_$c)* ($W "," $W "/" ($W "," $W $Pd_$c)*)?
$Pstar_$c ::= "*" $W $Pn_$c ($W "," $W ($Pn_$c | $Pd_$c))* | "*" ($W "," $W ($Pn_$c | $Pd_$c))+
$Pdstar_$c ::= "**" $W $Pn_$c
"""

# patterns of match statements (in the line and bracket contexts)
_PATTERNS = r"""
patterns_$c ::= pat_$c | spat_$c ($W "," $W spat_$c)+ ($W ",")? | spat_$c $W ","
pat_$c ::= orpat_$c ($W1 "as" $W1 name)?
orpat_$c ::= cpat_$c ($W "|" $W cpat_$c)*
spat_$c ::= pat_$c | "*" $W name
cpat_$c ::= litpat | dname | "(" $WB (patterns_$B $WB)? ")" | "[" $WB (spat_$B ($WB "," $WB spat_$B)* ($WB ",")? $WB)? "]" | "{" $WB (mapitems_$B $WB)? "}" | dname $W "(" $WB (clsargs_$B $WB)? ")"
mapitems_$c ::= mapitem_$c ($W "," $W mapitem_$c)* ($W "," $W "**" $W name)? ($W ",")? | "**" $W name ($W ",")?
mapitem_$c ::= (litpat | dname) $W ":" $W pat_$c
clsargs_$c ::= pat_$c ($W "," $W pat_$c)* ($W "," $W name $W "=" $W pat_$c)* ($W ",")? | name $W "=" $W pat_$c ($W "," $W name $W "=" $W pat_$c)* ($W ",")?
"""

# whitespace is written inline (a group inside each rule, never a rule of its own): a separate
# nullable rule would make every token that starts with a space "uncertain" for xgrammar's mask
# cache at each place it is referenced, and masks 100x slower. Comments stay a rule: their
# any-character body is costly to compile (every token fits it) and should exist once
# Optional whitespace starts with a character-class star, which xgrammar keeps inside the rule
# that writes it; only the rare backslash continuations and comments go into a nested group. As
# one starred group of alternatives (``([ \\t] | comment)*``) it became a rule of its own that a
# space-led token leaves at once, so inside brackets every such token was "uncertain" and masks
# after ``(`` or ``,`` cost 100-240 ms on 1,500 tokens; written this way they cost 0.02 ms.
_WL = '[ \\t\\f]* ("\\\\" "\\n" [ \\t\\f]*)*'
_WL1 = '([ \\t\\f] | "\\\\" "\\n") ' + _WL
_WN = '[ \\t\\f\\r\\n]* (("\\\\" "\\n" | comment) [ \\t\\f\\r\\n]*)*'
_WN1 = '([ \\t\\f\\r\\n] | "\\\\" "\\n" | comment) ' + _WN

_CONTEXTS = {
    # context: (W, W1, bracket context, lambda allowed, dict/set displays allowed)
    "l": (_WL, _WL1, "n", True, True),
    "n": (_WN, _WN1, "n", True, True),
    "d": ("[ \\t]*", "[ \\t]+", "d", False, False),
    "s": ("[ \\t]*", "[ \\t]+", "s", False, False),
}


def _fill(template: str, c: str, extra: dict[str, str] | None = None) -> str:
    w, w1, b, lam, braces = _CONTEXTS[c]
    subs = {
        **(extra or {}),
        "$LAMBDA": f"| lambda_{c}" if lam else "",
        "$BRACE": ' | "{" $WB (brace_$B $WB)? "}"' if braces else "",
    }
    out = template
    for k, v in subs.items():
        out = out.replace(k, v)
    for k, v in (("$WB", _CONTEXTS[b][0]), ("$W1", w1), ("$W", w), ("$B", b), ("$c", c)):
        out = out.replace(k, v)
    return out


def _expressions() -> list[str]:
    rules = []
    for c in _CONTEXTS:
        rules.append(_fill(_EXPR, c))
        rules.append(_fill(_PARAMS, c, {"$P": "lparams", "$ANN": ""}))
    rules.append(_fill(_PARAMS, "n", {"$P": "params", "$ANN": '($W ":" $W test_$c)?'}))
    for c in ("l", "n"):
        rules.append(_fill(_PATTERNS, c))
    return [r.strip() for r in rules]


# ------------------------------------------------------------------------------------- statements
# a simple statement owns its line end (tail): after a token such as " =" or " return" the
# parser's current rule cannot end inside the next token, so xgrammar's mask cache can decide
# space-led word tokens there without running the parser on each (see docs/python_grammar.md)
_SIMPLE_FLAVOURED = r"""
simple$L ::= tlist_l wl "=" wl assign$L | (name | tprim_l) wl augop wl (yield_l | testlist_l) tail$L | (name | tprim_l) wl ":" wl test_l (wl "=" wl (yield_l | starlist_l))? tail$L | starlist_l tail$L | "pass" tail$L | "return" (wl1 starlist_l | wl pstarlist_l)? tail$L | "raise" (kwtest (wl1 "from" wl1 test_l)?)? tail$L | ("global" | "nonlocal") wl1 name (wl "," wl name)* tail$L | "del" (wl1 tlist_l | wl "(" wn tlist_n wn ")") tail$L | "assert" kwtest (wl "," wl test_l)? tail$L | import tail$L | yield_l tail$L | "yield" wl pstarlist_l tail$L $BREAK
tail$L ::= wl (";" wl (simple$L | comment | "\n") | comment | "\n")
assign$L ::= tlist_l wl "=" wl assign$L | (yield_l | starlist_l) tail$L
"""

_SIMPLE = r"""
ptest_l ::= pchain_l (wl1 ("and" | "or") wl1 ("not" wl1)* chain_l)* (wl1 "if" wl1 or_l wl1 "else" wl1 test_l)?
pchain_l ::= "(" wn (paren_n wn)? ")" (wl trailer_l)* (wl binop wl operand_l | wl1 ("in" | "not" wl1 "in" | "is" | "is" wl1 "not") wl1 operand_l)*
pstarlist_l ::= ptest_l (wl "," wl sx_l)* (wl ",")?
kwtest ::= wl1 test_l | wl ptest_l
kwntest ::= wl1 ntest_l | wl ptest_l
import ::= "import" wl1 dname (wl1 "as" wl1 name)? (wl "," wl dname (wl1 "as" wl1 name)?)* | "from" wl1 ("."* dname | "."+) wl1 "import" (wl1 ialist_l | wl "(" wn ialist_n wn ")")
ialist_l ::= name (wl1 "as" wl1 name)? (wl "," wl name (wl1 "as" wl1 name)?)*
ialist_n ::= name (wn1 "as" wn1 name)? (wn "," wn name (wn1 "as" wn1 name)?)* (wn ",")?
witem_l ::= test_l (wl1 "as" wl1 target_l)?
witem_n ::= test_n (wn1 "as" wn1 target_n)?
withhead ::= "with" (wl1 witem_l (wl "," wl witem_l)* | wl "(" wn witem_n (wn "," wn witem_n)* (wn ",")? wn ")")
except ::= "except" (wl "*" wl test_l | wl1 test_l | wl "(" wn (paren_n wn)? ")") (wl1 "as" wl1 name)?
ifh ::= "if" kwntest wl ":"
elifh ::= "elif" kwntest wl ":"
elseh ::= "else" wl ":"
forh ::= ("async" wl1)? "for" wl1 tlist_l wl1 "in" wl1 starlist_l wl ":"
whileh ::= "while" kwntest wl ":"
tryh ::= "try" wl ":"
excepth ::= except wl ":"
bareexcepth ::= "except" wl ":"
finallyh ::= "finally" wl ":"
withh ::= ("async" wl1)? withhead wl ":"
defh ::= (("async" wl1)? "def" wl1 name wl "(" wn (params_n wn)? ")" (wl "->" wl test_l)? | "class" wl1 name (wl "(" wn (args_n wn)? ")")?) wl ":"
matchh ::= "match" wl1 subject wl ":" eol
caseh ::= "case" wl1 patterns_l (wl1 "if" wl1 ntest_l)? wl ":"
subject ::= ntest_l | se_l (wl "," wl se_l)+ (wl ",")? | se_l wl ","
"""

# one block level: $k this level, $K the next, $I this level's indentation, $L "" or "L" (in a loop)
_LEVEL = r"""
body$k$L ::= blank* stmt$k$L (stmt$k$L | blank)*
stmt$k$L ::= "$I" (simple$L | compound$k$L)
suite$k$L ::= wl simple$L $DEEPER
loopsuite$k ::= wl simpleL $DEEPERLOOP
defsuite$k ::= wl simple $DEEPERDEF
compound$k$L ::= ifh suite$k$L ("$I" elifh suite$k$L)* ("$I" elseh suite$k$L)? | forh loopsuite$k ("$I" elseh suite$k$L)? | whileh loopsuite$k ("$I" elseh suite$k$L)? | tryh suite$k$L (("$I" excepth suite$k$L)+ ("$I" bareexcepth suite$k$L)? | "$I" bareexcepth suite$k$L) ("$I" elseh suite$k$L)? ("$I" finallyh suite$k$L)? | tryh suite$k$L "$I" finallyh suite$k$L | withh suite$k$L | ("@" wl ntest_l eol blank* "$I")* defh defsuite$k $MATCH
"""


def _levels(depth: int, indent: str, first: int) -> list[str]:
    rules = [
        _SIMPLE_FLAVOURED.replace("$L", "").replace("$BREAK", "").strip(),
        _SIMPLE_FLAVOURED.replace("$L", "L").replace("$BREAK", '| ("break" | "continue") tailL').strip(),
        _SIMPLE.strip(),
    ]
    for k in range(first, depth + 1):
        for loop in ("", "L"):
            deeper = k < depth
            level = _LEVEL
            subs = {
                "$DEEPERLOOP": f"| eol body{k + 1}L" if deeper else "",
                "$DEEPERDEF": f"| eol body{k + 1}" if deeper else "",
                "$DEEPER": f"| eol body{k + 1}{loop}" if deeper else "",
                "$MATCH": (f"| matchh blank* case{k + 1}{loop} (case{k + 1}{loop} | blank)*" if k + 1 < depth else ""),
                "$k": str(k),
                "$L": loop,
                "$I": indent * k,
            }
            for name, value in subs.items():
                level = level.replace(name, value)
            if loop == "L":  # the loop-free suites are the same in both flavours: define them once
                level = "\n".join(ln for ln in level.splitlines() if not ln.startswith(("loopsuite", "defsuite")))
            rules.append(level.strip())
            if k + 1 < depth:
                rules.append(f'case{k + 1}{loop} ::= "{indent * (k + 1)}" caseh suite{k + 1}{loop}')
    return rules


def python_grammar(depth: int = 16, indent: str = "    ", start: str = "body", fence: bool = True) -> str:
    """EBNF (xgrammar) for Python source: statements indented by multiples of ``indent``.

    ``start="body"``: the body of a function whose ``def`` line (docstring line, ...) is the
    prompt: it starts with the newline that ends that line and has statements at one ``indent``,
    blocks nested ``depth - 1`` levels below it. ``start="module"``: a module (statements at
    column 0, ``depth`` levels below). ``fence``: the text may end with a closing Markdown code
    fence (chat models close their code with one; validators strip it).
    """
    if not isinstance(depth, int) or not 2 <= depth <= 64:
        raise ValueError(f"depth must be an int in [2, 64], got {depth!r}")
    if not indent or set(indent) - {" ", "\t"}:
        raise ValueError(f"indent must be a non-empty string of spaces and tabs, got {indent!r}")
    if start not in ("body", "module"):
        raise ValueError(f"start must be 'body' or 'module', got {start!r}")
    tail = ' ("```" "\\n"?)?' if fence else ""
    if start == "body":
        root = f'root ::= "\\n" body1{tail}'
        first = 1
    else:
        root = f"root ::= (blank | stmt0)*{tail}"
        first = 0
    reserved = [*keyword.kwlist, "__debug__"]
    rules = [
        root,
        *_levels(depth, indent, first),
        _LEXICAL.strip(),
        *_expressions(),
        identifier_rules("name", reserved),
    ]
    return _inline_whitespace("\n".join(rules))


def _inline_whitespace(grammar: str) -> str:
    """Replace references to the whitespace rules by their bodies (see _WL) and drop their definitions."""
    ws = {
        "wl": _WL,
        "wl1": _WL1,
        "wn": _WN,
        "wn1": _WN1,
        "wd": "[ \\t]*",
        "wd1": "[ \\t]+",
        "ws": "[ \\t]*",
        "ws1": "[ \\t]+",
        "eol": f'{_WL} (comment | "\\n")',
    }
    lines = [ln for ln in grammar.splitlines() if ln.split(" ::= ")[0] not in ws]
    pattern = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|\b(' + "|".join(ws) + r")\b")
    return "\n".join(pattern.sub(lambda m: ws[m.group(1)] if m.group(1) else m.group(0), ln) for ln in lines)
