"""Grammar builders for the recipes: a Python subset (the recipe now uses smcgen.grammars.python) and SQL
for a given schema (xgrammar EBNF)."""

from __future__ import annotations

import keyword

from smcgen.grammars.python import identifier_rules


def python_function_body_grammar(depth: int = 3) -> str:
    """The body of a Python function, from the newline that ends its ``def`` (or docstring) line:
    statements indented by 4 spaces,
    blocks nested ``depth`` levels, expressions with calls, subscripts, slices, attributes, lists,
    comprehensions, comparisons and boolean operators. Every string of the language parses
    (``ast.parse``) and compiles: no keyword is ever an identifier, no ``break``/``continue``
    outside loops (there are none), no leading zeros in numbers. The function may be followed by
    a closing Markdown fence (validators strip it), nothing else: no test code after it."""
    reserved = [*keyword.kwlist, "__debug__"]  # __debug__ cannot be assigned
    blocks = []
    for level in range(1, depth + 1):
        ind = " " * (4 * level)
        stmt = f'stmt{level} ::= "{ind}" simple "\\n"'
        # comment lines may come anywhere in a block, but a block needs one statement
        comment = f'comment{level} ::= "{ind}#" [^\\n]* "\\n"'
        if level < depth:
            nxt = f"block{level + 1}"
            stmt += (
                f' | "{ind}if " expr ":\\n" {nxt} ("{ind}elif " expr ":\\n" {nxt})* ("{ind}else:\\n" {nxt})?'
                f' | "{ind}for " target " in " expr ":\\n" {nxt}'
                f' | "{ind}while " expr ":\\n" {nxt}'
            )
        blocks.append(
            f"block{level} ::= comment{level}* stmt{level} (stmt{level} | comment{level})*\n{stmt}\n{comment}"
        )
    return "\n".join(
        [
            # the body starts with the newline of the previous line: a prompt that ends right after
            # the def line keeps the tokenizer's usual "\n   " + " if" split at the boundary
            # a chat model closes its code with a Markdown fence: allowed as the very end (validators strip it)
            'root ::= "\\n" block1 ("```" "\\n"?)?',
            *blocks,
            (
                'simple ::= "return" (" " exprlist)? | "pass" | target " = " exprlist | single augop expr | call'
                " | assert | docstring"
            ),
            'assert ::= "assert " expr (", " expr)?',
            r'docstring ::= "\"\"\"" [^"\\]* "\"\"\""',
            'single ::= ident ("[" expr "]" | "." ident)*',
            'target ::= single | ident (", " ident)+',
            'augop ::= " += " | " -= " | " *= " | " /= " | " //= " | " %= "',
            'exprlist ::= expr (", " expr)*',
            'expr ::= conj (" or " conj)*',
            'conj ::= neg (" and " neg)*',
            'neg ::= "not " neg | comparison',
            "comparison ::= arith (compop arith)*",
            'compop ::= " == " | " != " | " < " | " <= " | " > " | " >= " | " in " | " not in " | " is " | " is not "',
            'arith ::= term ((" + " | " - ") term)*',
            'term ::= factor ((" * " | " / " | " // " | " % ") factor)*',
            'factor ::= "-" factor | power',
            'power ::= atom ("**" factor)?',
            'atom ::= primary trailer* | number | string | "True" | "False" | "None" | "(" expr ")" | list',
            "primary ::= ident",
            'trailer ::= "(" (expr (", " expr)*)? ")" | "[" subscript "]" | "." ident',
            'subscript ::= expr | expr? ":" expr?',
            'call ::= primary trailer* "(" (expr (", " expr)*)? ")"',
            'list ::= "[" "]" | "[" expr (", " expr)* "]" | "[" expr " for " ident " in " expr (" if " expr)? "]"',
            'number ::= ("0" | [1-9] [0-9]*) ("." [0-9]+)?',
            'string ::= "\\"" [^"\\\\\\n]* "\\"" | "\'" [^\'\\\\\\n]* "\'"',
            identifier_rules("ident", reserved),
        ]
    )


def sql_grammar(tables: dict[str, list[str]], joins: list[tuple[str, str, str, str]]) -> str:
    """SELECT queries valid for a schema: ``tables`` maps table -> columns; ``joins`` lists
    (table1, column1, table2, column2) foreign keys that may be joined on.

    Single-table queries use that table's columns (bare or qualified); join queries use
    qualified columns, or bare ones that are unique among the joined tables. Aggregates appear
    in the select list, HAVING and ORDER BY, never in WHERE; HAVING only after GROUP BY.
    """
    rules = ['root ::= query ";"?']
    forms = []
    for i, (table, cols) in enumerate(tables.items()):
        refs = [c for c in cols] + [f"{table}.{c}" for c in cols]
        forms.append((f"t{i}", f'"FROM {table}"', refs))
    for j, (t1, c1, t2, c2) in enumerate(joins):
        counts: dict[str, int] = {}
        for c in tables[t1] + tables[t2]:
            counts[c] = counts.get(c, 0) + 1
        refs = [f"{t}.{c}" for t in (t1, t2) for c in tables[t]] + [
            c for c in tables[t1] + tables[t2] if counts[c] == 1
        ]
        forms.append((f"j{j}", f'"FROM {t1} JOIN {t2} ON {t1}.{c1} = {t2}.{c2}"', refs))
    rules.append("query ::= " + " | ".join(f"q_{f}" for f, _, _ in forms))
    for f, source, refs in forms:
        col = f"col_{f}"
        rules += [
            f"{col} ::= " + " | ".join(f'"{r}"' for r in sorted(set(refs), key=lambda r: (-len(r), r))),
            f'agg_{f} ::= "COUNT(*)" | aggfn "(" {col} ")" | "COUNT(DISTINCT " {col} ")"',
            f"item_{f} ::= {col} | agg_{f}",
            (
                f'cond_{f} ::= {col} cmp value | {col} " IS NULL" | {col} " IS NOT NULL" | {col} " LIKE " string'
                f' | {col} " IN (" value (", " value)* ")" | {col} " BETWEEN " value " AND " value'
            ),
            f'where_{f} ::= sep "WHERE " cond_{f} ((" AND " | " OR ") cond_{f})*',
            f'group_{f} ::= sep "GROUP BY " {col} (", " {col})* (sep "HAVING " agg_{f} cmp value)?',
            # ORDER BY an aggregate only in grouped queries (SQLite: "misuse of aggregate" otherwise)
            f'order_{f} ::= sep "ORDER BY " item_{f} (" ASC" | " DESC")? (", " item_{f} (" ASC" | " DESC")?)*',
            f'ordercol_{f} ::= sep "ORDER BY " {col} (" ASC" | " DESC")? (", " {col} (" ASC" | " DESC")?)*',
            (
                f'q_{f} ::= "SELECT " ("DISTINCT ")? ("*" | item_{f} (", " item_{f})*) sep {source}'
                f" where_{f}? (group_{f} order_{f}? | ordercol_{f})? limit?"
            ),
        ]
    rules += [
        'sep ::= " " | "\\n"',
        'aggfn ::= "SUM" | "AVG" | "MIN" | "MAX" | "COUNT"',
        'cmp ::= " = " | " != " | " < " | " <= " | " > " | " >= "',
        "value ::= number | string",
        'number ::= "-"? ("0" | [1-9] [0-9]*) ("." [0-9]+)?',
        'string ::= "\'" [^\'\\n]* "\'"',
        'limit ::= sep "LIMIT " [1-9] [0-9]{0,8}',  # SQLite rejects LIMITs beyond 64 bits
    ]
    return "\n".join(rules)
