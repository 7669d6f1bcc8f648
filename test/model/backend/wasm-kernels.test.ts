import * as tf from '@tensorflow/tfjs-core';
import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import { SeededRandom } from '../../../src/model/synthetic/seeded-random.js';
import { useWasm } from '../../helpers/tiny-models.js';

before(useWasm);

/** Element at a multi-index of a row-major array. */
function at(data: ArrayLike<number>, shape: number[], index: number[]): number {
  let flat = 0;
  for (let d = 0; d < shape.length; d++) flat = flat * shape[d] + index[d];
  return data[flat];
}

function* indices(shape: number[]): Generator<number[]> {
  const total = shape.reduce((a, b) => a * b, 1);
  const idx = new Array(shape.length).fill(0);
  for (let n = 0; n < total; n++) {
    yield [...idx];
    for (let d = shape.length - 1; d >= 0; d--) {
      if (++idx[d] < shape[d]) break;
      idx[d] = 0;
    }
  }
}

test('the wasm Slice replacement equals element-wise slicing for ranks 1–4, contiguous or not', () => {
  assert.equal(tf.getBackend(), 'wasm');
  const rng = new SeededRandom(5);
  for (let trial = 0; trial < 60; trial++) {
    const rank = 1 + (trial % 4);
    const shape = Array.from({ length: rank }, () => 1 + rng.int(5));
    const data = Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => rng.normal());
    const begin = shape.map((n) => rng.int(n));
    const size = shape.map((n, d) => (rng.next() < 0.3 ? -1 : 1 + rng.int(n - begin[d])));
    const x = tf.tensor(data, shape);
    const y = tf.slice(x, begin, size);
    const outShape = y.shape;
    const got = y.dataSync();
    let k = 0;
    for (const idx of indices(outShape)) {
      assert.equal(got[k++], at(data, shape, idx.map((v, d) => v + begin[d])), `shape ${shape} begin ${begin} size ${size}`);
    }
    x.dispose();
    y.dispose();
  }
});

test('the wasm GatherV2 replacement equals element-wise gathering on every axis, with repeats', () => {
  const rng = new SeededRandom(6);
  for (let trial = 0; trial < 40; trial++) {
    const rank = 1 + (trial % 4);
    const shape = Array.from({ length: rank }, () => 1 + rng.int(5));
    const data = Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => rng.normal());
    const axis = rng.int(rank);
    const idxList = Array.from({ length: 1 + rng.int(6) }, () => rng.int(shape[axis]));
    const x = tf.tensor(data, shape);
    const y = tf.gather(x, tf.tensor1d(idxList, 'int32'), axis);
    assert.deepEqual(y.shape, [...shape.slice(0, axis), idxList.length, ...shape.slice(axis + 1)]);
    const got = y.dataSync();
    let k = 0;
    for (const idx of indices(y.shape)) {
      const src = [...idx];
      src[axis] = idxList[idx[axis]];
      assert.equal(got[k++], at(data, shape, src));
    }
    x.dispose();
    y.dispose();
  }
  const x = tf.zeros([3, 2]);
  assert.throws(() => tf.gather(x, tf.tensor1d([3], 'int32')), /not in \[0, 2\]/);
  x.dispose();
});
