// The browser build's global, as a page script sees it.

import type {} from 'tidings-client/global';

const client = new window.Tidings({ token: 'a.jwt.token' });
const same: typeof window.Tidings = Tidings;
client.subscribe('public.demo', (publications) => publications.forEach((p) => console.log(p.data)));
console.log(same.compareOffsets('1-0', '2-0'), new Tidings.TidingsError('timeout', 'late').code);

export {};
