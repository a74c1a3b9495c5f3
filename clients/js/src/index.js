/*
 * tidings-client, the ES module (bundlers, Node): Socket.IO from the
 * socket.io-client package unless options.ioClient says otherwise.
 */

import { io } from 'socket.io-client';
import { Tidings, setDefaultIo } from './client.js';

setDefaultIo(io);

export { Tidings };
export { TidingsError } from './errors.js';
export { compareOffsets, isValidTopic, parseOffset } from './offsets.js';
export default Tidings;
