"""An SQL query under an SQL grammar for a given schema on SmolLM2-135M-Instruct.

The grammar (recipes/_grammars.py) is generated from the schema: SELECT queries over its tables
and foreign-key joins, with only the schema's column names. Compares unconstrained sampling,
plain masking and grammar-constrained SMC (N = 4, 8): validity (the query runs in ``sqlite3``
against the schema), the target's per-token log-likelihood, seconds per sample.

    python recipes/sql_query.py [--samples 32] [--draft] [--threads 1]
"""

from __future__ import annotations

import sqlite3

from _grammars import sql_grammar
from _harness import Task, main, strip_fence

from smcgen import GrammarPotential

SCHEMA_SQL = """CREATE TABLE departments (id INTEGER PRIMARY KEY, name TEXT, budget REAL);
CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT, department_id INTEGER REFERENCES departments(id),
                        salary REAL, hire_year INTEGER);"""
TABLES = {
    "departments": ["id", "name", "budget"],
    "employees": ["id", "name", "department_id", "salary", "hire_year"],
}
JOINS = [("employees", "department_id", "departments", "id")]


def valid_sql(text: str) -> bool:
    """Valid iff the reply (a surrounding Markdown code fence allowed) is one statement that runs
    against the schema in SQLite."""
    query = strip_fence(text, "sql")
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(SCHEMA_SQL)
        db.execute(query).fetchall()
    except (sqlite3.Error, sqlite3.Warning, ValueError):
        return False
    finally:
        db.close()
    return True


TASK = Task(
    title="Recipe: SQL query under an SQL grammar for a given schema",
    prompt=(
        f"Database schema (SQLite):\n{SCHEMA_SQL}\n\n"
        "Write one SQL query that lists the names of the employees of the 'Sales' department who earn more "
        "than 50000. Reply with the SQL query only."
    ),
    grammar=GrammarPotential.ebnf(sql_grammar(TABLES, JOINS)),
    validate=valid_sql,
    max_new_tokens=64,
)

if __name__ == "__main__":
    main(TASK, default_samples=32, description=__doc__)
