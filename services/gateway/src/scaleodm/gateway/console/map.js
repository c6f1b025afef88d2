// The task's map: the orthophoto's tiles (and the DSM's, as a toggle) from this gateway, over
// nothing: no base layer, the console works without the internet. Zoom is limited to the
// TileJSON's range and every tile layer to its bounds, so no tile outside the raster is asked for.

import { request } from './api.js';

const LEAFLET_URL = '/console/vendor/leaflet/leaflet.js?v=1.9.4';
let leaflet = null;

/** Leaflet, loaded on first use (a classic script: it defines window.L). */
export function loadLeaflet() {
  if (window.L) return Promise.resolve(window.L);
  if (!leaflet) {
    leaflet = new Promise((resolve, reject) => {
      const script = document.createElement('script');
      script.src = LEAFLET_URL;
      script.addEventListener('load', () => resolve(window.L));
      script.addEventListener('error', () => { leaflet = null; reject(new Error('The map library could not be loaded.')); });
      document.head.append(script);
    });
  }
  return leaflet;
}

function tilejson(uuid, layer) {
  return request(`/task/${encodeURIComponent(uuid)}/tilejson.json`, { params: { layer } });
}

function boundsOf(L, tj) {
  const b = Array.isArray(tj.bounds) && tj.bounds.length === 4 ? tj.bounds.map(Number) : null;
  if (!b || b.some((v) => !Number.isFinite(v))) throw new Error('The tile description has no bounds.');
  const [w, s, e, n] = b;
  return L.latLngBounds([s, w], [n, e]);
}

function tileLayer(L, tj) {
  if (!Array.isArray(tj.tiles) || typeof tj.tiles[0] !== 'string') {
    throw new Error('The tile description has no tile URL.');
  }
  const minZoom = Number.isFinite(tj.minzoom) ? tj.minzoom : 0;
  const maxZoom = Number.isFinite(tj.maxzoom) ? tj.maxzoom : 22;
  // The template already carries the token when one was given to tilejson.json. It is used as
  // it is: parsing it as a URL would escape its {z}/{x}/{y}. (The page's CSP allows images from
  // this origin only.)
  return L.tileLayer(tj.tiles[0], {
    bounds: boundsOf(L, tj), minZoom, maxZoom, maxNativeZoom: maxZoom, noWrap: true,
    tileSize: Number.isFinite(tj.tileSize) ? tj.tileSize : 256, crossOrigin: false,
  });
}

/**
 * Show the map of task `uuid` in `container`: the orthophoto, and the DSM as an overlay when
 * `hasDsm`. Returns an object with `remove()`.
 */
export async function showMap(container, uuid, { hasDsm = false } = {}) {
  const L = await loadLeaflet();
  const [ortho, dsm] = await Promise.all([
    tilejson(uuid, 'orthophoto'),
    hasDsm ? tilejson(uuid, 'dsm').catch(() => null) : Promise.resolve(null),
  ]);
  const orthoLayer = tileLayer(L, ortho);
  const bounds = boundsOf(L, ortho);
  const zooms = [ortho, dsm].filter(Boolean);
  const map = L.map(container, {
    attributionControl: false, // attributions are HTML in Leaflet: none from the server is shown
    minZoom: Math.min(...zooms.map((t) => (Number.isFinite(t.minzoom) ? t.minzoom : 0))),
    maxZoom: Math.max(...zooms.map((t) => (Number.isFinite(t.maxzoom) ? t.maxzoom : 22))),
    maxBounds: bounds.pad(1),
    maxBoundsViscosity: 0.8,
  });
  orthoLayer.addTo(map);
  const overlays = { Orthophoto: orthoLayer };
  if (dsm) overlays['Surface model (DSM)'] = tileLayer(L, dsm);
  L.control.layers(null, overlays, { collapsed: false }).addTo(map);
  L.control.scale({ imperial: false }).addTo(map);
  map.fitBounds(bounds);
  return { map, remove: () => map.remove(), layers: overlays };
}
