// A browser client of the ORIGINAL Xintu backend, written from its client guide
// (docs/客户端调用指南.md of xiawenyong1977-netizen/ImageClassiferBackend): plain
// browser JavaScript, no library, on an origin other than the API's.
//
// The flow is the guide's: GET /api/v1/health at start; for one photo, SHA-256 of the
// ORIGINAL file, check-cache (X-User-ID header), on a miss a canvas resize to a
// 1024 px long side as JPEG quality 0.8 uploaded with FormData (image + image_hash =
// the original's hash); for many, batch-check-cache (at most 100 hashes), the misses
// resized and sent to /classify/batch (at most 20 files, image_hashes as a JSON list).
// Then it asks again by the originals' hashes, as the app does the next time.
//
// Every call is recorded (status, response type, body); a strict client's checks are
// recorded next to them; the whole report is written as JSON into <pre id="report">,
// whose data-state becomes "done" at the end, whatever happened.
'use strict';

const CATEGORIES = [
  'social_activities', 'pets', 'single_person', 'foods',
  'travel_scenery', 'screenshot', 'idcard', 'other',
];
const MAX_SIDE = 1024;
const JPEG_QUALITY = 0.8;
const BATCH_CHECK_MAX = 100;
const BATCH_UPLOAD_MAX = 20;
const TIMEOUT_MS = 60000;

const params = new URLSearchParams(location.search);
const API_BASE_URL = (params.get('api') || '').replace(/\/+$/, '');
const USER = params.get('user') || 'album-user-1';
const OTHER_USER = params.get('other_user') || 'album-user-2';
const SINGLE = params.get('single') || '';
const BATCH = (params.get('batch') || '').split(',').filter(Boolean);
const CONTROL = params.get('control') || '';

const report = {
  page_origin: location.origin,
  api: API_BASE_URL,
  user: USER,
  other_user: OTHER_USER,
  control: null,
  health: null,
  single: null,
  batch: null,
  photos: [],
  calls: [],
  checks: [],
  errors: [],
};

function check(name, ok, detail) {
  report.checks.push({ name, ok: Boolean(ok), detail: detail === undefined ? null : detail });
  return Boolean(ok);
}

function setStatus(text) {
  document.getElementById('status').textContent = text;
}

// --- the API calls, as in the guide's JavaScript example ---------------------------------

async function callApi(step, path, init = {}) {
  const call = {
    step, method: init.method || 'GET', path,
    status: null, response_type: null, request_id_header: null, body: null, error: null,
  };
  report.calls.push(call);
  let response;
  try {
    response = await fetch(API_BASE_URL + path, { ...init, signal: AbortSignal.timeout(TIMEOUT_MS) });
  } catch (err) {
    call.error = `${err.name}: ${err.message}`;
    throw new Error(`${step}: fetch failed (${call.error})`);
  }
  call.status = response.status;
  call.response_type = response.type;
  call.request_id_header = response.headers.get('X-Request-ID');
  const text = await response.text();
  try {
    call.body = JSON.parse(text);
  } catch {
    call.body_text = text.slice(0, 300);
  }
  return call;
}

function checkHealth() {
  return callApi('health', '/api/v1/health');
}

async function calculateSHA256(file) {
  const buffer = await file.arrayBuffer();
  const digest = await crypto.subtle.digest('SHA-256', buffer);
  return Array.from(new Uint8Array(digest)).map((b) => b.toString(16).padStart(2, '0')).join('');
}

// 1024 px on the long side, aspect ratio kept, JPEG at quality 0.8 (the guide: "必须").
function resizeImage(file) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    const url = URL.createObjectURL(file);
    img.onload = () => {
      URL.revokeObjectURL(url);
      let width = img.naturalWidth;
      let height = img.naturalHeight;
      if (width > MAX_SIDE || height > MAX_SIDE) {
        if (width > height) {
          height = Math.round((height / width) * MAX_SIDE);
          width = MAX_SIDE;
        } else {
          width = Math.round((width / height) * MAX_SIDE);
          height = MAX_SIDE;
        }
      }
      const canvas = document.createElement('canvas');
      canvas.width = width;
      canvas.height = height;
      canvas.getContext('2d').drawImage(img, 0, 0, width, height);
      canvas.toBlob((blob) => {
        if (!blob) {
          reject(new Error(`could not encode ${file.name} as JPEG`));
          return;
        }
        const name = file.name.replace(/\.[^.]+$/, '') + '.jpg';
        resolve({ file: new File([blob], name, { type: 'image/jpeg' }), width, height });
      }, 'image/jpeg', JPEG_QUALITY);
    };
    img.onerror = () => {
      URL.revokeObjectURL(url);
      reject(new Error(`could not decode ${file.name}`));
    };
    img.src = url;
  });
}

function checkCache(imageHash, userId) {
  const headers = { 'Content-Type': 'application/json' };
  if (userId) headers['X-User-ID'] = userId;
  return callApi('check-cache', '/api/v1/classify/check-cache', {
    method: 'POST', headers, body: JSON.stringify({ image_hash: imageHash }),
  });
}

function uploadAndClassify(imageFile, imageHash, userId) {
  const formData = new FormData();
  formData.append('image', imageFile);
  formData.append('image_hash', imageHash);
  const headers = {};
  if (userId) headers['X-User-ID'] = userId;
  return callApi('classify', '/api/v1/classify', { method: 'POST', headers, body: formData });
}

function batchCheckCache(imageHashes, userId) {
  const headers = { 'Content-Type': 'application/json' };
  if (userId) headers['X-User-ID'] = userId;
  return callApi('batch-check-cache', '/api/v1/classify/batch-check-cache', {
    method: 'POST', headers, body: JSON.stringify({ image_hashes: imageHashes }),
  });
}

function batchClassify(imageFiles, imageHashes, userId) {
  const formData = new FormData();
  imageFiles.forEach((file) => formData.append('images', file));
  if (imageHashes && imageHashes.length > 0) {
    formData.append('image_hashes', JSON.stringify(imageHashes));
  }
  const headers = {};
  if (userId) headers['X-User-ID'] = userId;
  return callApi('classify-batch', '/api/v1/classify/batch', { method: 'POST', headers, body: formData });
}

// --- what a strict client checks ------------------------------------------------------------

function isMiss(item) {
  return item !== null && typeof item === 'object' && item.cached === false
    && Object.prototype.hasOwnProperty.call(item, 'data') && item.data === null;
}

function checkData(name, data) {
  const ok = data !== null && typeof data === 'object';
  check(`${name}: data.category is one of the eight keys`, ok && CATEGORIES.includes(data.category),
    ok ? data.category : data);
  check(`${name}: data.confidence is a number in 0..1`,
    ok && typeof data.confidence === 'number' && data.confidence >= 0 && data.confidence <= 1,
    ok ? data.confidence : null);
}

function checkAnswer(name, call) {
  check(`${name}: answered 200`, call.status === 200, call.status);
  check(`${name}: readable cross-origin (response type cors)`, call.response_type === 'cors',
    call.response_type);
  const body = call.body || {};
  check(`${name}: request_id is a string`, typeof body.request_id === 'string', body.request_id);
  check(`${name}: timestamp is ISO 8601`,
    typeof body.timestamp === 'string' && !Number.isNaN(Date.parse(body.timestamp)), body.timestamp);
  return body;
}

// --- the steps --------------------------------------------------------------------------------

async function controlStep() {
  // An origin that sends no CORS headers: a cors-mode fetch must fail, while the same URL
  // is reachable (an opaque no-cors answer). So the API's answers below are readable only
  // because the API sends CORS headers.
  const control = { url: CONTROL, cors_fetch: null, no_cors_fetch: null };
  report.control = control;
  try {
    const r = await fetch(CONTROL, { signal: AbortSignal.timeout(TIMEOUT_MS) });
    control.cors_fetch = `resolved ${r.status}`;
  } catch (err) {
    control.cors_fetch = `rejected ${err.name}`;
  }
  try {
    const r = await fetch(CONTROL, { mode: 'no-cors', signal: AbortSignal.timeout(TIMEOUT_MS) });
    control.no_cors_fetch = `resolved ${r.type}`;
  } catch (err) {
    control.no_cors_fetch = `rejected ${err.name}`;
  }
  check('control: a cors fetch to an origin without CORS headers fails',
    control.cors_fetch === 'rejected TypeError', control.cors_fetch);
  check('control: the same URL answers an opaque no-cors fetch',
    control.no_cors_fetch === 'resolved opaque', control.no_cors_fetch);
}

async function healthStep() {
  const call = await checkHealth();
  report.health = call.body;
  check('health: answered 200', call.status === 200, call.status);
  check('health: readable cross-origin (response type cors)', call.response_type === 'cors',
    call.response_type);
  const body = call.body || {};
  check('health: status is healthy or unhealthy', ['healthy', 'unhealthy'].includes(body.status),
    body.status);
  check('health: database is connected or disconnected',
    ['connected', 'disconnected'].includes(body.database), body.database);
  check('health: model_api is available or not_configured',
    ['available', 'not_configured'].includes(body.model_api), body.model_api);
  check('health: timestamp is ISO 8601',
    typeof body.timestamp === 'string' && !Number.isNaN(Date.parse(body.timestamp)), body.timestamp);
  if (body.status !== 'healthy') setStatus('the classification service is unavailable');
}

async function loadPhoto(name) {
  const response = await fetch(`photos/${encodeURIComponent(name)}`);
  if (!response.ok) throw new Error(`photos/${name}: ${response.status}`);
  const blob = await response.blob();
  const file = new File([blob], name, { type: blob.type });
  const photo = {
    name, file, hash: await calculateSHA256(file), bytes: file.size,
    category: null, via: null, error: null,
  };
  report.photos.push({ name, hash: photo.hash, bytes: photo.bytes, category: null, via: null });
  return photo;
}

function recordPhoto(photo) {
  const entry = report.photos.find((p) => p.name === photo.name);
  entry.category = photo.category;
  entry.via = photo.via;
  entry.error = photo.error;
}

async function describeResized(resized) {
  const head = new Uint8Array(await resized.file.slice(0, 3).arrayBuffer());
  return {
    name: resized.file.name,
    width: resized.width,
    height: resized.height,
    bytes: resized.file.size,
    type: resized.file.type,
    jpeg_magic: head[0] === 0xff && head[1] === 0xd8 && head[2] === 0xff,
    hash: await calculateSHA256(resized.file),
  };
}

async function singleStep(photo) {
  const single = { name: photo.name, original_hash: photo.hash, resized: null };
  report.single = single;

  const first = checkAnswer('single check-cache (before)', await checkCache(photo.hash, USER));
  single.first_cached = first.cached;
  check('single check-cache (before): a miss with "data": null', isMiss(first), first);
  if (first.cached) {
    photo.category = first.data && first.data.category;
    photo.via = 'cache';
    return;
  }

  const resized = await resizeImage(photo.file);
  single.resized = await describeResized(resized);
  const upload = checkAnswer('single classify', await uploadAndClassify(resized.file, photo.hash, USER));
  single.upload = upload;
  check('single classify: success', upload.success === true, upload.success);
  check('single classify: processing_time_ms is an integer',
    Number.isInteger(upload.processing_time_ms), upload.processing_time_ms);
  check('single classify: from_cache is false', upload.from_cache === false, upload.from_cache);
  checkData('single classify', upload.data);
  const category = upload.data ? upload.data.category : null;
  photo.category = category;
  photo.via = 'upload';

  const again = checkAnswer('single check-cache (after)', await checkCache(photo.hash, USER));
  single.second = again;
  check('single check-cache (after): cached by the original\'s hash', again.cached === true,
    again.cached);
  check('single check-cache (after): the same category',
    again.data !== null && typeof again.data === 'object' && again.data.category === category,
    again.data);

  const other = checkAnswer('single check-cache (other user)', await checkCache(photo.hash, OTHER_USER));
  single.other_user = other;
  check('single check-cache (other user): a miss with "data": null', isMiss(other), other);
}

function chunks(list, size) {
  const out = [];
  for (let i = 0; i < list.length; i += size) out.push(list.slice(i, i + size));
  return out;
}

async function batchStep(photos) {
  const batch = { hashes: photos.map((p) => p.hash), resized: [], uploads: [] };
  report.batch = batch;
  const byHash = new Map(photos.map((p) => [p.hash, p]));
  const known = new Map();

  for (const hashes of chunks(batch.hashes, BATCH_CHECK_MAX)) {
    const first = checkAnswer('batch-check-cache (before)', await batchCheckCache(hashes, USER));
    batch.first = first;
    const items = Array.isArray(first.items) ? first.items : [];
    check('batch-check-cache (before): one item per hash', items.length === hashes.length,
      items.length);
    check('batch-check-cache (before): total', first.total === hashes.length, first.total);
    for (const item of items) {
      if (item.cached) {
        checkData(`batch-check-cache (before) hit ${item.image_hash.slice(0, 12)}`, item.data);
        known.set(item.image_hash, { category: item.data && item.data.category, via: 'cache' });
      } else {
        check(`batch-check-cache (before) miss ${String(item.image_hash).slice(0, 12)}: "data": null`,
          isMiss(item), item);
      }
    }
    check('batch-check-cache (before): cached_count counts the hits',
      first.cached_count === items.filter((i) => i.cached).length, first.cached_count);
  }

  const misses = photos.filter((p) => !known.has(p.hash));
  batch.misses = misses.map((p) => p.name);
  for (const group of chunks(misses, BATCH_UPLOAD_MAX)) {
    const resized = [];
    for (const photo of group) {
      const r = await resizeImage(photo.file);
      batch.resized.push({ photo: photo.name, ...(await describeResized(r)) });
      resized.push(r.file);
    }
    const hashes = group.map((p) => p.hash);
    const answer = checkAnswer('classify batch', await batchClassify(resized, hashes, USER));
    batch.uploads.push(answer);
    check('classify batch: success', answer.success === true, answer.success);
    check('classify batch: total_processing_time_ms is an integer',
      Number.isInteger(answer.total_processing_time_ms), answer.total_processing_time_ms);
    const items = Array.isArray(answer.items) ? answer.items : [];
    check('classify batch: one item per file', items.length === group.length, items.length);
    check('classify batch: success_count', answer.success_count === group.length,
      answer.success_count);
    items.forEach((item, index) => {
      const label = `classify batch item ${index}`;
      check(`${label}: index`, item.index === index, item.index);
      check(`${label}: success`, item.success === true, item.error);
      check(`${label}: processing_time_ms is an integer`, Number.isInteger(item.processing_time_ms),
        item.processing_time_ms);
      checkData(label, item.data);
      if (item.success && item.data) {
        known.set(hashes[index], { category: item.data.category, via: 'upload' });
      } else {
        byHash.get(hashes[index]).error = item.error;
      }
    });
  }

  for (const hashes of chunks(batch.hashes, BATCH_CHECK_MAX)) {
    const again = checkAnswer('batch-check-cache (after)', await batchCheckCache(hashes, USER));
    batch.second = again;
    const items = Array.isArray(again.items) ? again.items : [];
    check('batch-check-cache (after): every original hash cached',
      items.length === hashes.length && items.every((i) => i.cached === true),
      items.filter((i) => !i.cached).map((i) => i.image_hash));
    check('batch-check-cache (after): cached_count', again.cached_count === hashes.length,
      again.cached_count);
    for (const item of items) {
      const before = known.get(item.image_hash);
      check(`batch-check-cache (after) ${String(item.image_hash).slice(0, 12)}: the same category`,
        before !== undefined && item.data !== null && typeof item.data === 'object'
          && item.data.category === before.category,
        { before: before ? before.category : null, after: item.data ? item.data.category : null });
    }
  }

  for (const photo of photos) {
    const found = known.get(photo.hash);
    if (found && photo.via === null) {
      photo.category = found.category;
      photo.via = found.via;
    }
  }
}

// --- the page ---------------------------------------------------------------------------------

async function showPhotos(photos) {
  const grid = document.getElementById('photos');
  const loads = [];
  for (const photo of photos) {
    const figure = document.createElement('figure');
    const img = document.createElement('img');
    img.alt = photo.name;
    img.src = URL.createObjectURL(photo.file);
    loads.push(img.decode().catch(() => undefined));
    const caption = document.createElement('figcaption');
    const category = document.createElement('b');
    category.textContent = photo.category || (photo.error ? 'failed' : '—');
    category.className = photo.via || 'failed';
    caption.append(category, `${photo.name} · ${photo.via || photo.error || 'no answer'}`);
    figure.append(img, caption);
    grid.append(figure);
  }
  await Promise.all(loads);
}

async function step(name, fn) {
  try {
    await fn();
  } catch (err) {
    report.errors.push(`${name}: ${err && err.message ? err.message : String(err)}`);
  }
}

async function main() {
  let photos = [];
  await step('control', controlStep);
  await step('health', healthStep);
  await step('photos', async () => {
    for (const name of [SINGLE, ...BATCH]) photos.push(await loadPhoto(name));
  });
  if (photos.length > 0) {
    await step('single', () => singleStep(photos[0]));
    await step('batch', () => batchStep(photos));
  }
  photos.forEach(recordPhoto);
  await step('show', () => showPhotos(photos));
  const failed = report.checks.filter((c) => !c.ok).length;
  setStatus(`${photos.length} photos · ${report.checks.length - failed} checks passed, `
    + `${failed} failed · ${report.errors.length} errors`);
}

main()
  .catch((err) => report.errors.push(`main: ${err && err.message ? err.message : String(err)}`))
  .finally(() => {
    const pre = document.getElementById('report');
    pre.textContent = JSON.stringify(report, null, 1);
    pre.dataset.state = 'done';
  });
