import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { test } from 'node:test';

/**
 * A table's cells as GitHub splits them: on every `|` not escaped as `\|` (a pipe inside a
 * code span splits too), without the outer pipes.
 */
export function cellsOf(row: string): string[] {
  const cells = row.trim().replace(/^\|/, '').replace(/(?<!\\)\|$/, '').split(/(?<!\\)\|/);
  return cells.map((c) => c.trim());
}

/** Every table (header, delimiter row, body rows) outside fenced code blocks, with line numbers. */
export function tablesOf(markdown: string): { line: number; rows: { line: number; text: string }[] }[] {
  const tables: { line: number; rows: { line: number; text: string }[] }[] = [];
  let fenced = false;
  let current: { line: number; rows: { line: number; text: string }[] } | undefined;
  markdown.split('\n').forEach((text, i) => {
    if (/^\s*(```|~~~)/.test(text)) fenced = !fenced;
    const isRow = !fenced && /^\s*\|/.test(text);
    if (isRow) {
      current ??= { line: i + 1, rows: [] };
      current.rows.push({ line: i + 1, text });
    } else if (current) {
      tables.push(current);
      current = undefined;
    }
  });
  if (current) tables.push(current);
  return tables;
}

for (const file of ['README.md', 'BENCHMARKS.md']) {
  test(`${file}: every table has a delimiter row and as many cells in each row as its header`, async () => {
    const tables = tablesOf(await readFile(new URL(`../../${file}`, import.meta.url), 'utf8'));
    assert.ok(tables.length > 0);
    for (const { line, rows } of tables) {
      const width = cellsOf(rows[0].text).length;
      assert.ok(rows.length >= 2, `${file}:${line}: a table needs a header and a delimiter row`);
      const delimiter = cellsOf(rows[1].text);
      assert.ok(delimiter.every((c) => /^:?-+:?$/.test(c)), `${file}:${rows[1].line}: the second row must be the delimiter (|---|---|), got ${rows[1].text}`);
      for (const row of rows) assert.equal(cellsOf(row.text).length, width, `${file}:${row.line}: ${cellsOf(row.text).length} cells, header has ${width}: ${row.text}`);
    }
  });
}

test('the table checker counts cells as GitHub does', () => {
  assert.deepEqual(cellsOf('| a | `x\\|y` | c |'), ['a', '`x\\|y`', 'c']);
  assert.equal(cellsOf('| a | b | c |').length, 3);
  assert.equal(cellsOf('| a | `b | c` |').length, 3, 'an unescaped pipe in a code span still splits');
  assert.deepEqual(tablesOf('x\n| a |\n|---|\n| 1 |\n\n```\n| not | a table |\n```\n').map((t) => t.rows.length), [3]);
});
