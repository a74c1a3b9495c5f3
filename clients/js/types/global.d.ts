// The browser build (dist/tidings.js, /static/tidings.js) defines window.Tidings:
//   /// <reference types="tidings-client/global" />  (or: import type {} from 'tidings-client/global')

import type { Tidings as TidingsClass } from './index.js';

declare global {
  var Tidings: typeof TidingsClass;
}

export {};
